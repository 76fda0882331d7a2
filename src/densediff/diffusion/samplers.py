"""Samplers for continuous map diffusion: DDP Algorithm 2 (the loop) and Algorithm 3 (DDIM).

Model-agnostic: the loop only needs a ``denoise(x_t, log_snr) -> prediction`` function (the map
decoder, with the image features already bound), a ``to_x0(prediction) -> encoded map`` function
(segmentation: argmax then re-encode, the "hard re-quantisation" of the official code) and a
log-SNR schedule from :mod:`densediff.diffusion.schedules`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm import tqdm

from densediff.diffusion.schedules import LogSNRSchedule, alpha_sigma

__all__ = ["ddim_step", "ddpm_step", "sample", "sampling_times", "seeded_normal", "seeded_uniform"]


PROGRESS_MIN_STEPS = 50
"""Sampling runs of this many steps or more show a progress bar on a terminal."""


def sampling_times(steps: int, td: float = 1.0, start: float = 1.0) -> list[tuple[float, float]]:
    """The (t_now, t_next) pairs of Algorithm 2 with the asymmetric time difference ``td``.

    ``t_now = 1 - s/T`` and ``t_next = max(1 - (s + 1 + td)/T, 0)`` for s = 0..T-1: the next
    time is pushed ``td`` steps further than the uniform grid. T = 3, td = 1 gives
    (1 -> 1/3), (2/3 -> 0), (1/3 -> 0). ``start`` < 1 scales every time by ``start``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return [(start * (1 - s / steps), max(start * (1 - (s + 1 + td) / steps), 0.0))
            for s in range(steps)]


def ddim_step(x_t: torch.Tensor, x0: torch.Tensor, log_snr_now: torch.Tensor,
              log_snr_next: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM update (eta = 0), Algorithm 3.

    ``eps = (x_t - alpha_now x0) / sigma_now``; ``x_next = alpha_next x0 + sigma_next eps``.
    (The printed Alg. 3 writes ``sqrt(1 - alpha_now)`` in the last line; the official code and
    DDIM use sigma at t_next, as here.)
    """
    a_now, s_now = alpha_sigma(log_snr_now)
    a_next, s_next = alpha_sigma(log_snr_next)
    eps = (x_t - a_now * x0) / s_now.clamp(min=1e-8)
    return a_next * x0 + s_next * eps


def ddpm_step(x_t: torch.Tensor, x0: torch.Tensor, log_snr_now: torch.Tensor,
              log_snr_next: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """Ancestral (DDPM) update from t_now to t_next in log-SNR form (Kingma et al. 2021):
    ``c = -expm1(log_snr_now - log_snr_next)``, mean ``alpha_next (x_t (1 - c)/alpha_now + c x0)``,
    variance ``sigma_next^2 c``; ``noise`` None (the last step, t_next = 0) adds none."""
    a_now, _ = alpha_sigma(log_snr_now)
    a_next, s_next = alpha_sigma(log_snr_next)
    c = -torch.expm1(log_snr_now - log_snr_next)
    mean = a_next * (x_t * (1 - c) / a_now + c * x0)
    if noise is None:
        return mean
    return mean + (s_next.pow(2) * c).sqrt() * noise


def seeded_normal(shape: Sequence[int], generators: Sequence[torch.Generator] | None,
                  device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of ``shape`` whose leading dimension is split evenly over
    ``generators`` (one per image), so that an image gets the same noise whatever batch it is
    in. ``generators`` None: the global RNG."""
    return _seeded(torch.randn, shape, generators, device, dtype)


def seeded_uniform(shape: Sequence[int], generators: Sequence[torch.Generator] | None,
                   device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform [0, 1) noise, seeded per image like :func:`seeded_normal`."""
    return _seeded(torch.rand, shape, generators, device, dtype)


def _seeded(draw, shape, generators, device, dtype) -> torch.Tensor:
    if generators is None:
        return draw(*shape, device=device, dtype=dtype)
    n = len(generators)
    if shape[0] % n:
        raise ValueError(f"leading dimension {shape[0]} is not a multiple of {n} generators")
    per = (shape[0] // n, *shape[1:])
    return torch.cat([draw(per, generator=g, device=g.device, dtype=dtype).to(device)
                      for g in generators])


def sample(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
           to_x0: Callable[[torch.Tensor], torch.Tensor], x_T: torch.Tensor,
           schedule: LogSNRSchedule, steps: int, td: float = 1.0, sampler: str = "ddim",
           noise: Callable[[], torch.Tensor] | None = None, start: float = 1.0
           ) -> list[torch.Tensor]:
    """Algorithm 2: denoise from t = 1 in ``steps`` steps; return every step's prediction.

    Args:
        denoise: ``(x_t, log_snr) -> prediction`` (log_snr has one value per batch item).
        to_x0: ``prediction -> x0`` in the encoded map space (same shape as ``x_T``).
        x_T: the starting noise, N x C x h x w.
        schedule: ``t -> log_snr``.
        steps: number of decoder evaluations T (dynamic inference: any T >= 1).
        td: asymmetric time difference.
        sampler: ``ddim`` (deterministic given x_T) or ``ddpm`` (ancestral).
        noise: for ``ddpm``, a function returning fresh N x C x h x w noise (seeded by the
            caller); None: ``torch.randn_like``.
        start: the time of the first step (1: pure noise, as Alg. 2; below 1 the step grid
            is scaled into [0, start], the starting noise is used as it is).

    Returns:
        ``steps`` predictions, in order (the last one is the output).
    """
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"unknown sampler {sampler!r}; expected ddim or ddpm")
    x_t = x_T
    n = x_T.shape[0]
    preds = []
    times = sampling_times(steps, td, start)
    if steps >= PROGRESS_MIN_STEPS:  # long sampling: a progress bar (shown on a terminal only)
        times = tqdm(times, desc=f"sampling {steps} steps", leave=False, disable=None)
    for t_now, t_next in times:
        ls_now = schedule(torch.full((n,), t_now, device=x_t.device, dtype=torch.float32))
        pred = denoise(x_t, ls_now)
        preds.append(pred)
        if len(preds) == steps:
            break  # the last x_next is never used
        ls_next = schedule(torch.full((n,), t_next, device=x_t.device, dtype=torch.float32))
        x0 = to_x0(pred)
        ls_now, ls_next = ls_now.view(-1, 1, 1, 1), ls_next.view(-1, 1, 1, 1)
        if sampler == "ddim":
            x_t = ddim_step(x_t, x0, ls_now, ls_next)
        else:
            eps = None
            if t_next > 0:
                eps = noise() if noise is not None else torch.randn_like(x_t)
            x_t = ddpm_step(x_t, x0, ls_now, ls_next, eps)
    return preds
