"""DDPS mask codecs: how a class map enters the denoiser, is noised (DDPS Alg. 1) and is
sampled (DDPS Alg. 2). A codec is the part of DDPS that depends on the kind of diffusion; the
model (:class:`densediff.models.ddps.DDPS`) holds one and stays the same for both:

- :class:`DiscreteCodec` (``model.ddps.codec: resize``, the paper's default): categorical
  diffusion on the label map at the feature grid (App. A Eq. 1-3, a
  :class:`~densediff.diffusion.transitions.DiscreteTransition`); the noisy states enter the
  denoiser through a frozen random embedding (official), the time as ``1000 t / T``;
  sampling is :func:`~densediff.diffusion.samplers.sample_discrete`;
- :class:`BitCodec` (``codec: bits``, App. A / Table 8): analog bits
  (:class:`~densediff.diffusion.encodings.AnalogBits`) with DDP's Gaussian diffusion (cosine
  log-SNR schedule, the time input is log-SNR); sampling is DDP's DDIM
  (:func:`~densediff.diffusion.samplers.sample_ddim`, td = 1).

Every method takes and returns plain tensors; the denoiser is passed in as a function, so
this module knows nothing of the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from densediff.diffusion.encodings import AnalogBits
from densediff.diffusion.noise import add_noise, generators, seeded_normal, seeded_uniform
from densediff.diffusion.samplers import (
    GuidableDenoise,
    StepCallback,
    guided,
    sample_ddim,
    sample_discrete,
    sample_prior,
)
from densediff.diffusion.schedules import get_schedule
from densediff.diffusion.transitions import DiscreteTransition

__all__ = ["BitCodec", "DiscreteCodec", "MaskCodec", "NoisyMask"]


@dataclass
class NoisyMask:
    """A noisy mask as the denoiser takes it: ``x_in`` (B x channels x h x w, the encoded
    mask) and ``time`` (B values, the denoiser's time input). For the discrete codec also the
    states ``x_t`` (B x h x w) and noise levels ``t`` (B integers), which the VLB needs."""

    x_in: torch.Tensor
    time: torch.Tensor
    x_t: torch.Tensor | None = None
    t: torch.Tensor | None = None


class MaskCodec(nn.Module):
    """The interface: ``channels`` (of the encoded mask input) and ``max_steps`` (None: any
    step count), and the methods below."""

    channels: int
    max_steps: int | None

    def noise(self, x0: torch.Tensor, first_step_only: bool) -> NoisyMask:
        """Alg. 1: t drawn per image (only the first sampling step's, the noisiest, when
        ``first_step_only``), x_t ~ q(x_t | x0) for class indices ``x0`` (B x h x w)."""
        raise NotImplementedError

    def pure_noise(self, b: int, h: int, w: int, device: torch.device) -> NoisyMask:
        """x_T at the first sampling step's time (for the "first prediction" target)."""
        raise NotImplementedError

    def middle(self, b: int, h: int, w: int, device: torch.device) -> NoisyMask:
        """A noisy input at the middle noise level (one call for ``densediff bench``)."""
        raise NotImplementedError

    def sample(self, denoise: GuidableDenoise, shape: Sequence[int], steps: int, *,
               guidance: float, renoise: str, seeds: Sequence[int] | None,
               device: torch.device, callback: StepCallback | None = None) -> torch.Tensor:
        """Alg. 2: ``steps`` calls of ``denoise(x_in, time, with_uncond)`` with guidance scale
        ``guidance``; ``callback(step, logits)`` gets every step's B x K x h x w logits, the
        last ones are returned. ``shape`` = (B, h, w); ``seeds``: one per image (None: the
        global RNG)."""
        raise NotImplementedError


class DiscreteCodec(MaskCodec):
    """Categorical diffusion over the K classes (see the module doc).

    Args:
        transition: the forward process and posterior (T = its ``timesteps``).
        embed_channels: channels of the frozen random state embedding (official 16).
    """

    def __init__(self, transition: DiscreteTransition, embed_channels: int):
        super().__init__()
        self.transition = transition
        # frozen random embedding of the states, as the official (never trained)
        self.register_buffer("state_embed", torch.randn(transition.num_states, embed_channels))
        self.channels = embed_channels
        self.max_steps = transition.timesteps

    def embed(self, states: torch.Tensor) -> torch.Tensor:
        """States (B x h x w) -> B x embed_channels x h x w."""
        return self.state_embed[states].permute(0, 3, 1, 2)

    def time(self, t: torch.Tensor) -> torch.Tensor:
        """The denoiser's time input for noise level t in 1..T: ``1000 t / T`` (a model means
        the same by it whatever T)."""
        return t.float() * (1000.0 / self.transition.timesteps)

    def _input(self, x_t: torch.Tensor, t: torch.Tensor) -> NoisyMask:
        return NoisyMask(self.embed(x_t), self.time(t), x_t, t)

    def noise(self, x0: torch.Tensor, first_step_only: bool) -> NoisyMask:
        T, b = self.transition.timesteps, x0.shape[0]
        t = (torch.full((b,), T, device=x0.device) if first_step_only
             else torch.randint(1, T + 1, (b,), device=x0.device))
        return self._input(self.transition.add_noise(x0, t), t)  # Eq. 2

    def pure_noise(self, b: int, h: int, w: int, device: torch.device) -> NoisyMask:
        x_T = sample_prior(self.transition, (b, h, w),
                           lambda size: seeded_uniform(size, None, device))
        return self._input(x_T, torch.full((b,), self.transition.timesteps, device=device))

    def middle(self, b: int, h: int, w: int, device: torch.device) -> NoisyMask:
        t = torch.full((b,), max(1, self.transition.timesteps // 2), device=device)
        x = sample_prior(self.transition, (b, h, w),
                         lambda size: seeded_uniform(size, None, device))
        return self._input(x, t)

    def sample(self, denoise: GuidableDenoise, shape: Sequence[int], steps: int, *,
               guidance: float, renoise: str, seeds: Sequence[int] | None,
               device: torch.device, callback: StepCallback | None = None) -> torch.Tensor:
        gens = generators(seeds, device, shape[0])

        def uniform(size: Sequence[int]) -> torch.Tensor:
            return seeded_uniform(size, gens, device)

        step = guided(denoise, guidance)
        return sample_discrete(lambda x_t, t: step(self.embed(x_t), self.time(t)),
                               sample_prior(self.transition, shape, uniform), self.transition,
                               steps, renoise=renoise, noise=uniform, callback=callback)

    def vlb(self, logits: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor
            ) -> torch.Tensor:
        """The variational bound terms of Eq. 4 at noise level t (one per image), on the
        feature grid: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 1 and
        -log p(x0 | x_1) for t = 1, with p from the predicted x0 distribution. Ignore pixels
        (x0 outside 0..K-1), and pixels whose x_t is impossible under x0 (possible when x0 !=
        the noise target), are left out; the mean is over the rest."""
        tr = self.transition
        valid = (x0 >= 0) & (x0 < tr.num_classes)
        x0c = torch.where(valid, x0, torch.zeros_like(x0))
        p0 = logits.float().softmax(1)
        s = t - 1
        q_post = tr.posterior(x_t, tr.one_hot(x0c), s, t)
        p_post = tr.posterior(x_t, p0, s, t)
        kl = (q_post * (q_post.clamp(min=1e-30).log() - p_post.clamp(min=1e-30).log())).sum(1)
        nll = -p0.gather(1, x0c[:, None])[:, 0].clamp(min=1e-30).log()
        first = (t == 1).view(-1, 1, 1)
        term = torch.where(first, nll, kl)
        possible = tr.likelihood(x_t, 0, t).gather(1, x0c[:, None])[:, 0] > 0
        use = valid & possible
        return (term * use).sum() / use.sum().clamp(min=1)


class BitCodec(MaskCodec):
    """Analog bits with DDP's Gaussian diffusion (see the module doc): continuous time in
    [0, 1), the cosine log-SNR schedule, the denoiser fed log-SNR.

    Args:
        bits: the analog-bit encoding (its ``channels`` = ceil(log2(K + 1))).
    """

    max_steps = None  # continuous time: any step count

    def __init__(self, bits: AnalogBits):
        super().__init__()
        self.bits = bits
        self.log_snr = get_schedule("cosine")
        self.channels = bits.channels

    def noise(self, x0: torch.Tensor, first_step_only: bool) -> NoisyMask:
        b, (h, w) = x0.shape[0], x0.shape[-2:]
        t = (torch.ones(b, device=x0.device) if first_step_only
             else torch.empty(b, device=x0.device).uniform_(0.0, 0.999))
        log_snr = self.log_snr(t)
        eps = torch.randn(b, self.channels, h, w, device=x0.device)
        return NoisyMask(add_noise(self.bits(x0), log_snr, eps), log_snr)

    def pure_noise(self, b: int, h: int, w: int, device: torch.device) -> NoisyMask:
        x_T = torch.randn(b, self.channels, h, w, device=device)
        return NoisyMask(x_T, self.log_snr(torch.ones(b, device=device)))

    def middle(self, b: int, h: int, w: int, device: torch.device) -> NoisyMask:
        log_snr = self.log_snr(torch.full((b,), 0.5, device=device))
        return NoisyMask(torch.randn(b, self.channels, h, w, device=device), log_snr)

    def sample(self, denoise: GuidableDenoise, shape: Sequence[int], steps: int, *,
               guidance: float, renoise: str, seeds: Sequence[int] | None,
               device: torch.device, callback: StepCallback | None = None) -> torch.Tensor:
        """DDIM (DDP Alg. 2/3) with the analog bits of argmax x0_hat, td = 1 (``renoise`` does
        not apply: the Gaussian update re-noises)."""
        b, h, w = shape
        x_T = seeded_normal((b, self.channels, h, w), generators(seeds, device, b), device)
        step = guided(denoise, guidance)

        def denoise_step(x_t: torch.Tensor, log_snr: torch.Tensor, _x0_prev: None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
            logits = step(x_t, log_snr)
            return logits, self.bits(logits.argmax(1))

        return sample_ddim(denoise_step, x_T, self.log_snr, steps, td=1.0, callback=callback)
