"""Diffusion machinery, kept apart from the models: noise schedules, map encodings, samplers."""

from densediff.diffusion.encodings import AnalogBits, ClassEmbedding, OneHot, build_label_encoding
from densediff.diffusion.samplers import ddim_step, ddpm_step, sample, sampling_times
from densediff.diffusion.schedules import alpha_sigma, cosine_log_snr, get_schedule, linear_log_snr

__all__ = ["AnalogBits", "ClassEmbedding", "OneHot", "alpha_sigma", "build_label_encoding",
           "cosine_log_snr", "ddim_step", "ddpm_step", "get_schedule", "linear_log_snr", "sample",
           "sampling_times"]
