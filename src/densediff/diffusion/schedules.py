"""Continuous-time noise schedules expressed as log-SNR, and the time embedding.

DDP (paper §3.3, Alg. 1 and 3) corrupts the encoded map as ``y_t = alpha(t) y_0 + sigma(t) eps``
with ``t`` in [0, 1]. Following the official code (reference notes §1.4), a schedule returns the
log signal-to-noise ratio ``log_snr(t)``; then ``alpha = sqrt(sigmoid(log_snr))`` and
``sigma = sqrt(sigmoid(-log_snr))``, so ``alpha^2 + sigma^2 = 1``. The decoder is conditioned on
``log_snr`` (not ``t``) through :class:`LearnedSinusoidalPosEmb` and an MLP.

Schedules are plain functions of a tensor ``t``; the model and the sampler take one as an
argument, so the three stay separate.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["LogSNRSchedule", "alpha_sigma", "cosine_log_snr", "cosine_unclamped_log_snr",
           "get_schedule", "linear_log_snr", "schedule_time", "LearnedSinusoidalPosEmb",
           "TimeEmbedding"]

_NS, _DS = 0.0002, 0.00025

LogSNRSchedule = Callable[[torch.Tensor], torch.Tensor]


def cosine_log_snr(t: torch.Tensor, ns: float = 0.0002, ds: float = 0.00025,
                   clamp: float = 1e-5) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021) as log-SNR, exactly as the official DDP code.

    ``log_snr(t) = -log(max(cos((t + ns) / (1 + ds) * pi/2)^-2 - 1, clamp))`` (paper Alg. 3,
    ``alpha_cumprod``). The clamp caps log-SNR at ``-log(1e-5) ~ 11.51`` near t = 0; away from
    it ``sigmoid(log_snr) = cos^2((t + ns) / (1 + ds) * pi/2)``.
    """
    c = torch.cos((t + ns) / (1 + ds) * math.pi * 0.5)
    return -torch.log(torch.clamp(c.pow(-2) - 1, min=clamp))


def cosine_unclamped_log_snr(t: torch.Tensor, ns: float = _NS, ds: float = _DS) -> torch.Tensor:
    """The official depth variant of the cosine schedule: alpha_bar = ``gamma(t) =
    cos^2((t + ns) / (1 + ds) * pi/2)`` used as is, without the log-SNR clamp.

    As log-SNR: ``log(gamma / (1 - gamma)) = -2 log tan(theta)``, computed in that form so that
    it stays exact near t = 0 (where ``1 - gamma`` underflows in float32).
    """
    return -2 * torch.log(torch.tan((t + ns) / (1 + ds) * math.pi * 0.5))


def linear_log_snr(t: torch.Tensor) -> torch.Tensor:
    """The "linear" schedule of the official code: ``-log(expm1(1e-4 + 10 t^2))``
    (the continuous-time version of DDPM's linear beta schedule, Kingma et al. 2021)."""
    return -torch.log(torch.expm1(1e-4 + 10 * t * t))


def get_schedule(name: str) -> LogSNRSchedule:
    """``cosine`` or ``linear`` (paper Table 5c), or ``cosine_unclamped`` (official depth)."""
    schedules = {"cosine": cosine_log_snr, "linear": linear_log_snr,
                 "cosine_unclamped": cosine_unclamped_log_snr}
    if name not in schedules:
        raise ValueError(f"unknown noise schedule {name!r}; expected one of {sorted(schedules)}")
    return schedules[name]


def schedule_time(name: str, log_snr: torch.Tensor) -> torch.Tensor:
    """The time t of a log-SNR value under schedule ``name`` (the inverse of the schedule), for
    models whose time embedding is fed t (``diffusion.time_input: t``, the official depth DDP)
    while the sampler works in log-SNR.

    cosine: ``t = atan(exp(-log_snr / 2)) * 2/pi * (1 + ds) - ns`` (where the clamp bites,
    log_snr = -log(1e-5), this gives the clamp's edge, t ~ 0.002); linear:
    ``t = sqrt((log1p(exp(-log_snr)) - 1e-4) / 10)``. Results are clipped to [0, 1].
    """
    if name in ("cosine", "cosine_unclamped"):
        t = torch.atan(torch.exp(-0.5 * log_snr)) * (2 / math.pi) * (1 + _DS) - _NS
    elif name == "linear":
        t = ((torch.nn.functional.softplus(-log_snr) - 1e-4) / 10).clamp(min=0).sqrt()
    else:
        raise ValueError(f"unknown noise schedule {name!r}")
    return t.clamp(0.0, 1.0)


def alpha_sigma(log_snr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``alpha = sqrt(sigmoid(log_snr))``, ``sigma = sqrt(sigmoid(-log_snr))``."""
    return torch.sigmoid(log_snr).sqrt(), torch.sigmoid(-log_snr).sqrt()


class LearnedSinusoidalPosEmb(nn.Module):
    """``x -> [x, sin(2 pi x w), cos(2 pi x w)]`` with ``dim/2`` learned frequencies ``w``
    (N(0, 1) init), as in the official code (from ``lucidrains``' denoising-diffusion).
    Output size ``dim + 1``."""

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"dim must be even, got {dim}")
        self.weights = nn.Parameter(torch.randn(dim // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 1).to(self.weights.dtype)
        freqs = x * self.weights[None] * (2 * math.pi)
        return torch.cat([x, freqs.sin(), freqs.cos()], dim=-1)


class TimeEmbedding(nn.Sequential):
    """The DDP time MLP: LearnedSinusoidalPosEmb(f) -> Linear(f+1 -> 4C) -> GELU ->
    Linear(4C -> 4C). Input: one value per image (log-SNR for segmentation); output B x 4C."""

    def __init__(self, frequencies: int, out_channels: int):
        super().__init__(LearnedSinusoidalPosEmb(frequencies), nn.Linear(frequencies + 1, out_channels),
                         nn.GELU(), nn.Linear(out_channels, out_channels))
        self.out_channels = out_channels
