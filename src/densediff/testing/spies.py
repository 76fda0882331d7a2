"""Spies on a diffusion model's denoiser, and the check of self-aligned training they serve."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from densediff.diffusion import alpha_sigma

__all__ = ["DenoiseCall", "assert_self_aligned", "record_denoise"]


@dataclass
class DenoiseCall:
    """One call of ``model.denoise``: whether autograd was on, and detached copies of its
    log-SNR, its noisy input ``x_t`` and its output."""

    grad: bool
    log_snr: torch.Tensor
    x_t: torch.Tensor
    out: torch.Tensor


def record_denoise(model) -> list[DenoiseCall]:
    """Wrap ``model.denoise`` so that each call is appended to the returned list (the calls
    themselves run unchanged)."""
    calls: list[DenoiseCall] = []
    denoise = model.denoise

    def spy(feat, x_t, log_snr):
        out = denoise(feat, x_t, log_snr)
        calls.append(DenoiseCall(torch.is_grad_enabled(), log_snr.detach().clone(),
                                 x_t.detach().clone(), out.detach().clone()))
        return out

    model.denoise = spy
    return calls


def assert_self_aligned(model, calls: list[DenoiseCall], encode_own, gt: torch.Tensor, *,
                        atol: float, gt_atol: float) -> None:
    """Alg. 4 (self-aligned training) in the two recorded denoiser calls of one training step:
    the first is the prediction from pure noise at t = 1; the second input is
    ``alpha * y0 + sigma * eps`` with ``y0 = encode_own(first output)`` (the model's own
    prediction, encoded) and ``eps`` the first call's input, to ``atol`` -- and not the same
    with ``gt`` (the GT's encoding) as ``y0``, to ``gt_atol``."""
    assert len(calls) == 2
    first, second = calls
    assert torch.allclose(first.log_snr, model.schedule(torch.ones_like(first.log_snr)))
    a, s = (v.view(-1, 1, 1, 1) for v in alpha_sigma(second.log_snr))
    with torch.no_grad():
        own = encode_own(first.out)
    assert torch.allclose(second.x_t, a * own + s * first.x_t, atol=atol)
    assert not torch.allclose(second.x_t, a * gt + s * first.x_t, atol=gt_atol)
