"""Diffusion machinery, kept apart from the models: noise schedules, map encodings, the forward
noise and seeded noise, samplers, discrete transitions and the DDPS mask codecs."""

from densediff.diffusion.encodings import AnalogBits, ClassEmbedding, OneHot, build_label_encoding
from densediff.diffusion.noise import add_noise, generators, seeded_normal, seeded_uniform
from densediff.diffusion.samplers import (
    SAMPLERS,
    classifier_free_guidance,
    ddim_step,
    ddpm_step,
    sample_ddim,
    sample_ddpm,
    sample_discrete,
    sampling_times,
)
from densediff.diffusion.schedules import alpha_sigma, cosine_log_snr, get_schedule, linear_log_snr

__all__ = ["SAMPLERS", "AnalogBits", "ClassEmbedding", "OneHot", "add_noise", "alpha_sigma",
           "build_label_encoding", "classifier_free_guidance", "cosine_log_snr", "ddim_step",
           "ddpm_step", "generators", "get_schedule", "linear_log_snr", "sample_ddim",
           "sample_ddpm", "sample_discrete", "sampling_times", "seeded_normal",
           "seeded_uniform"]
