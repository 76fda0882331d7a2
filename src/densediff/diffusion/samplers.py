"""Samplers: DDP's for continuous map diffusion (DDP Algorithm 2, the loop, and Algorithm 3,
DDIM: :func:`sample`) and DDPS's for discrete mask diffusion (DDPS Algorithm 2, stride sampling
with re-noising and classifier-free guidance: :func:`sample_discrete`).

Model-agnostic: a loop only needs a denoise function (the map decoder / denoiser with the
image's condition already bound) and the noise process. :func:`sample` takes a
``denoise(x_t, log_snr) -> prediction`` function, a ``to_x0(prediction) -> encoded map``
function (segmentation: argmax then re-encode, the "hard re-quantisation" of the official code)
and a log-SNR schedule from :mod:`densediff.diffusion.schedules`; :func:`sample_discrete` a
``denoise(x_t, t, with_uncond) -> x0 logits`` function and a
:class:`~densediff.diffusion.transitions.DiscreteTransition`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm import tqdm

from densediff.diffusion.schedules import LogSNRSchedule, alpha_sigma
from densediff.diffusion.transitions import DiscreteTransition, sample_categorical, stride_times

__all__ = ["GuidableDenoise", "MapDenoise", "classifier_free_guidance", "ddim_step",
           "ddpm_step", "guided", "sample", "sample_discrete", "sample_map", "sample_prior",
           "sampling_times", "seeded_normal", "seeded_uniform"]

GuidableDenoise = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]
"""``denoise(x, time, with_uncond) -> x0 logits``: B x K x h x w conditional logits, or with
``with_uncond`` 2B x K x h x w, the conditional then the unconditional ones (condition
dropped), from one batched call."""


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


MapDenoise = Callable[..., torch.Tensor]
"""``denoise(features, x_t, log_snr, x0_prev=None) -> prediction``: the map decoder on
(repeated) image features; ``x0_prev`` (self-conditioning only) is the previous x0 estimate,
None at the first step."""


def sample_map(denoise: MapDenoise, to_x0: Callable[[torch.Tensor], torch.Tensor],
               feat: torch.Tensor, channels: int, schedule: LogSNRSchedule, steps: int, *,
               td: float = 1.0, sampler: str = "ddim", randsteps: int = 1,
               seeds: Sequence[int] | None = None, start: float = 1.0,
               self_condition: bool = False) -> list[torch.Tensor]:
    """DDP's sampling on precomputed image features: the seeded starting noise, ``randsteps``
    starts per image, self-conditioning, then :func:`sample`. Shared by ``DDP.sample_steps``
    and the onnxruntime model (:mod:`densediff.deploy`), so both draw the same noise.

    Args:
        denoise: see :data:`MapDenoise`; called on ``feat`` repeated ``randsteps`` times per
            image (image-major).
        to_x0: ``prediction -> x0`` in the encoded map space.
        feat: B x C x h x w features.
        channels: channels of the encoded map.
        schedule, steps, td, sampler, start: as :func:`sample`.
        randsteps: noise starts per image (R).
        seeds: one seed per image (one ``torch.Generator`` each, on ``feat``'s device): the
            image's noise then does not depend on the batch it is in. None: the global RNG.
        self_condition: feed the previous step's x0 estimate to ``denoise``.

    Returns:
        ``steps`` predictions, each B x R x ... (the last one is the output).
    """
    b, _, h, w = feat.shape
    r = randsteps
    if seeds is not None and len(seeds) != b:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {b}")
    gens = None
    if seeds is not None:
        gens = [torch.Generator(device=feat.device).manual_seed(int(s)) for s in seeds]
    shape = (b * r, channels, h, w)
    # noise and updates in at least float32, also when the network runs in bf16 (autocast)
    work = torch.promote_types(feat.dtype, torch.float32)
    x_T = seeded_normal(shape, gens, feat.device, work)
    feat_r = feat.repeat_interleave(r, dim=0)  # image-major: (b r)
    prev: list[torch.Tensor | None] = [None]  # self-conditioning: the last x0 estimate

    def step(x: torch.Tensor, ls: torch.Tensor) -> torch.Tensor:
        if not self_condition:
            return denoise(feat_r, x, ls).to(work)
        out = denoise(feat_r, x, ls, prev[0]).to(work)
        prev[0] = to_x0(out)
        return out

    preds = sample(step, to_x0, x_T, schedule, steps, td, sampler,
                   noise=lambda: seeded_normal(shape, gens, feat.device, work),
                   start=start)
    return [p.view(b, r, *p.shape[1:]) for p in preds]


# -------------------------------------------------------------------------------- DDPS (discrete)


def classifier_free_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float
                             ) -> torch.Tensor:
    """Classifier-free guidance on logits (DDPS §3.4): ``(s + 1) l_c - s l_u``."""
    return (scale + 1) * cond - scale * uncond


def guided(denoise: GuidableDenoise, guidance: float
           ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(x, time) -> logits`` with classifier-free guidance scale ``guidance`` from a
    :data:`GuidableDenoise`: s = 0 is one plain conditional call; otherwise one call on the
    doubled batch, combined by :func:`classifier_free_guidance`."""

    def step(x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        if guidance == 0:
            return denoise(x, time, False)
        cond, uncond = denoise(x, time, True).chunk(2)
        return classifier_free_guidance(cond, uncond, guidance)

    return step


def sample_prior(transition: DiscreteTransition, shape: Sequence[int],
                 uniform: Callable[[Sequence[int]], torch.Tensor] | None = None) -> torch.Tensor:
    """x_T ~ q(x_T), the stationary distribution: ``shape`` = (B, h, w) states. ``uniform``:
    ``shape -> uniform (0, 1) noise`` (seeded by the caller); None: ``torch.rand``."""
    b, h, w = shape
    prior = transition.prior_probs().view(1, -1, 1, 1).expand(b, -1, h, w)
    u = (torch.rand(*prior.shape, device=prior.device) if uniform is None
         else uniform(prior.shape))
    return sample_categorical(prior, u)


def sample_discrete(denoise: GuidableDenoise, transition: DiscreteTransition,
                    shape: Sequence[int], steps: int, *, renoise: str = "free",
                    guidance: float = 0.0,
                    uniform: Callable[[Sequence[int]], torch.Tensor] | None = None
                    ) -> list[torch.Tensor]:
    """DDPS Algorithm 2: stride sampling of a categorical diffusion; every step's x0 logits.

    With the transition's forward process (DDPS App. A Eq. 1, one step
    ``q(x_t | x_{t-1}) = Cat(x_t; x_{t-1} Q_t)``; Eq. 2, the marginal
    ``q(x_t | x_0) = Cat(x_t; x_0 Qbar_t)``, ``Qbar_t = Q_1 ... Q_t``) and posterior (Eq. 3,
    ``q(x_s | x_t, x_0) = q(x_t | x_s) q(x_s | x_0) / q(x_t | x_0)``):

    1. x_T ~ q(x_T), the stationary distribution (:func:`sample_prior`);
    2. for the stride times t_1 = T > t_2 > ... > t_n >= 1
       (:func:`~densediff.diffusion.transitions.stride_times`, ``n = steps`` up to repeats):
       x0 logits ``l = denoise(x_t, t)``, with classifier-free guidance
       ``(s + 1) l_c - s l_u`` when ``guidance`` s > 0 (:func:`guided`);
    3. unless last, re-noise to the next time s = t_{k+1}: ``free``
       ``x_s ~ q(x_s | argmax l)`` (Eq. 2; the official sampler) or ``posterior``
       ``x_s ~ q(x_s | x_t, x0_hat)``, Eq. 3 averaged over ``x0_hat ~ softmax(l)``.

    Args:
        denoise: ``(x_t, t, with_uncond) -> x0 logits`` (:data:`GuidableDenoise`) on the
            states x_t (B x h x w) and the noise levels t (B integers in 1..T).
        transition: the categorical forward process and posterior (T = its ``timesteps``).
        shape: (B, h, w), the state map.
        steps: denoiser calls, 1..T.
        renoise: ``free`` or ``posterior``.
        guidance: classifier-free guidance scale s (0: off).
        uniform: ``shape -> uniform (0, 1) noise`` for every draw (seeded by the caller, e.g.
            per image with :func:`seeded_uniform`); None: ``torch.rand``.

    Returns:
        one B x K x h x w logits tensor per step, in order (the last one is the output).
    """
    if renoise not in ("free", "posterior"):
        raise ValueError(f"unknown re-noising {renoise!r}; expected free or posterior")
    step = guided(denoise, guidance)
    draw = uniform if uniform is not None else (
        lambda size: torch.rand(*size, device=transition.abar.device))
    times = stride_times(transition.timesteps, steps)
    x_t = sample_prior(transition, shape, draw)
    preds = []
    for k, t in enumerate(times):
        logits = step(x_t, torch.full((shape[0],), t, device=x_t.device))
        preds.append(logits)
        if k == len(times) - 1:
            break
        s = times[k + 1]
        if renoise == "free":
            probs = transition.q_probs(logits.argmax(1), s)
        else:
            probs = transition.posterior(x_t, logits.float().softmax(1), s, t)
        x_t = sample_categorical(probs, draw(probs.shape))
    return preds
