"""Noise: the forward process q(y_t | y_0) of DDP's Gaussian diffusion (:func:`add_noise`) and
noise drawn per image from seeds (:func:`generators`, :func:`seeded_normal`,
:func:`seeded_uniform`), so that an image's noise does not depend on the batch it is in.

The categorical forward process of DDPS is
:meth:`densediff.diffusion.transitions.DiscreteTransition.add_noise` (same name, its own
noise: uniform draws for the Gumbel-max trick).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from densediff.diffusion.schedules import alpha_sigma

__all__ = ["add_noise", "generators", "seeded_normal", "seeded_uniform"]


def add_noise(y0: torch.Tensor, log_snr: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """q(y_t | y_0) (DDP §3, Alg. 1): ``y_t = alpha y_0 + sigma eps`` with
    ``(alpha, sigma) = alpha_sigma(log_snr)``; ``log_snr`` holds one value per batch item of
    ``y0`` (B x ...), ``eps`` is standard normal noise of ``y0``'s shape."""
    alpha, sigma = (v.view(-1, *[1] * (y0.dim() - 1)) for v in alpha_sigma(log_snr))
    return alpha * y0 + sigma * eps


def generators(seeds: Sequence[int] | None, device: torch.device | str,
               batch: int | None = None) -> list[torch.Generator] | None:
    """One ``torch.Generator`` per image, seeded with its seed, on ``device``; None for
    ``seeds`` None (the global RNG). ``batch``: the batch size the seeds must match
    (ValueError otherwise)."""
    if seeds is None:
        return None
    if batch is not None and len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {batch}")
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def seeded_normal(shape: Sequence[int], gens: Sequence[torch.Generator] | None,
                  device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of ``shape`` whose leading dimension is split evenly over
    ``gens`` (one per image, :func:`generators`), so that an image gets the same noise
    whatever batch it is in. ``gens`` None: the global RNG."""
    return _seeded(torch.randn, shape, gens, device, dtype)


def seeded_uniform(shape: Sequence[int], gens: Sequence[torch.Generator] | None,
                   device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform [0, 1) noise, seeded per image like :func:`seeded_normal`."""
    return _seeded(torch.rand, shape, gens, device, dtype)


def _seeded(draw, shape, gens, device, dtype) -> torch.Tensor:
    if gens is None:
        return draw(*shape, device=device, dtype=dtype)
    n = len(gens)
    if shape[0] % n:
        raise ValueError(f"leading dimension {shape[0]} is not a multiple of {n} generators")
    per = (shape[0] // n, *shape[1:])
    return torch.cat([draw(per, generator=g, device=g.device, dtype=dtype).to(device)
                      for g in gens])
