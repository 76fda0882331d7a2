"""Diffusion machinery, kept apart from the models: noise schedules, map encodings, samplers,
discrete transitions and the DDPS mask codecs."""

from densediff.diffusion.encodings import AnalogBits, ClassEmbedding, OneHot, build_label_encoding
from densediff.diffusion.samplers import (
    classifier_free_guidance,
    ddim_step,
    ddpm_step,
    sample,
    sample_discrete,
    sampling_times,
)
from densediff.diffusion.schedules import alpha_sigma, cosine_log_snr, get_schedule, linear_log_snr

__all__ = ["AnalogBits", "ClassEmbedding", "OneHot", "alpha_sigma", "build_label_encoding",
           "classifier_free_guidance", "cosine_log_snr", "ddim_step", "ddpm_step", "get_schedule",
           "linear_log_snr", "sample", "sample_discrete", "sampling_times"]
