"""Samplers: DDP's for continuous map diffusion (DDP Algorithm 2, the loop, with Algorithm 3's
DDIM update: :func:`sample_ddim`; or the ancestral update: :func:`sample_ddpm`) and DDPS's
for discrete mask diffusion (DDPS Algorithm 2, stride sampling with re-noising:
:func:`sample_discrete`).

Model-agnostic: a sampler sees a denoise function (the network with the image's condition
already bound), the starting noise, the noise process and the step count, and reports every
step's prediction to a ``callback(step, prediction)``; it returns the last prediction.

- The Gaussian samplers share one signature (:data:`GaussianSampler`) and are listed in
  :data:`SAMPLERS` under the names ``model.diffusion.sampler`` takes. Their ``denoise`` is a
  :data:`StepDenoise`, ``(x_t, log_snr, x0_prev) -> (prediction, x0)``: the prediction and
  its re-encoding as the x0 estimate in the map space (segmentation: argmax then the map
  encoding, the "hard re-quantisation" of the official code); the process is a log-SNR
  schedule from :mod:`densediff.diffusion.schedules`.
- :func:`sample_discrete` has the same shape for a categorical process: ``denoise(x_t, t)
  -> x0 logits`` and a :class:`~densediff.diffusion.transitions.DiscreteTransition`.

:func:`sample_map` is DDP's sampling on image features (seeded starts, ``randsteps`` starts
per image, the sampler of :data:`SAMPLERS`): ``DDP.sample_steps`` and the onnxruntime model
both run it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import torch
from tqdm import tqdm

from densediff.diffusion.noise import generators, seeded_normal
from densediff.diffusion.schedules import LogSNRSchedule, alpha_sigma
from densediff.diffusion.transitions import DiscreteTransition, sample_categorical, stride_times

__all__ = ["SAMPLERS", "GaussianSampler", "GuidableDenoise", "MapStep", "Noise", "StepCallback",
           "StepDenoise", "classifier_free_guidance", "ddim_step", "ddpm_step", "guided",
           "sample_ddim", "sample_ddpm", "sample_discrete", "sample_map", "sample_prior",
           "sampling_times"]

StepDenoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None],
                       tuple[torch.Tensor, torch.Tensor]]
"""``denoise(x_t, log_snr, x0_prev) -> (prediction, x0)``: one network call on x_t (N x C x
h x w) at ``log_snr`` (N values), and the prediction re-encoded as the x0 estimate (x_t's
shape). ``x0_prev``: the previous step's x0 estimate with self-conditioning, else None."""

StepCallback = Callable[[int, torch.Tensor], None]
"""``callback(step, prediction)``: called once per network call, in order (step 0 first)."""

Noise = Callable[[Sequence[int]], torch.Tensor]
"""``shape -> noise`` of the distribution a sampler draws (Gaussian samplers: standard normal;
the discrete sampler: uniform in (0, 1)); seeded by the caller, e.g. per image."""

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
    """Ancestral (DDPM) update from t_now to t_next in log-SNR form (Kingma et al. 2021,
    Eq. 32-33): ``c = -expm1(log_snr_now - log_snr_next)``, mean
    ``alpha_next (x_t (1 - c)/alpha_now + c x0)``, variance ``sigma_next^2 c``; ``noise`` None
    (the last step, t_next = 0) adds none."""
    a_now, _ = alpha_sigma(log_snr_now)
    a_next, s_next = alpha_sigma(log_snr_next)
    c = -torch.expm1(log_snr_now - log_snr_next)
    mean = a_next * (x_t * (1 - c) / a_now + c * x0)
    if noise is None:
        return mean
    return mean + (s_next.pow(2) * c).sqrt() * noise


def _time_grid(schedule: LogSNRSchedule, x_T: torch.Tensor, steps: int, td: float,
               start: float) -> Iterable[tuple[int, float, torch.Tensor, torch.Tensor]]:
    """Algorithm 2's steps: ``(s, t_next, log_snr_now, log_snr_next)`` for s = 0..steps-1
    (:func:`sampling_times`), log-SNR as one value per batch item of ``x_T``; a progress bar
    (on a terminal only) from :data:`PROGRESS_MIN_STEPS` steps."""
    times = sampling_times(steps, td, start)
    if steps >= PROGRESS_MIN_STEPS:
        times = tqdm(times, desc=f"sampling {steps} steps", leave=False, disable=None)
    n, dev = x_T.shape[0], x_T.device
    for s, (t_now, t_next) in enumerate(times):
        yield (s, t_next, schedule(torch.full((n,), t_now, device=dev, dtype=torch.float32)),
               schedule(torch.full((n,), t_next, device=dev, dtype=torch.float32)))


def _col(log_snr: torch.Tensor) -> torch.Tensor:
    return log_snr.view(-1, 1, 1, 1)


def denoising_loop(denoise: StepDenoise, x_T: torch.Tensor, schedule: LogSNRSchedule,
                   steps: int, update: Callable[..., torch.Tensor], *, td: float = 1.0,
                   start: float = 1.0, self_condition: bool = False,
                   callback: StepCallback | None = None) -> torch.Tensor:
    """DDP Algorithm 2's loop: from x_T at t = ``start``, ``steps`` calls of ``denoise`` at
    the times of :func:`sampling_times`, each reported to ``callback`` and followed (but the
    last) by ``x_t <- update(x_t, x0, log_snr_now, log_snr_next, t_next)`` (log-SNR as
    N x 1 x 1 x 1); with ``self_condition`` each call gets the previous x0 estimate. Returns
    the last prediction."""
    x_t, x0 = x_T, None
    for s, t_next, ls_now, ls_next in _time_grid(schedule, x_T, steps, td, start):
        pred, x0 = denoise(x_t, ls_now, x0 if self_condition else None)
        if callback is not None:
            callback(s, pred)
        if s == steps - 1:
            break  # the last x_next is never used
        x_t = update(x_t, x0, _col(ls_now), _col(ls_next), t_next)
    return pred


def sample_ddim(denoise: StepDenoise, x_T: torch.Tensor, schedule: LogSNRSchedule, steps: int,
                *, td: float = 1.0, start: float = 1.0, self_condition: bool = False,
                noise: Noise | None = None, callback: StepCallback | None = None
                ) -> torch.Tensor:
    """DDP Algorithm 2 with the DDIM update of Algorithm 3 (:func:`ddim_step`): from x_T at
    t = ``start``, ``steps`` calls of ``denoise`` at the times of :func:`sampling_times`, each
    followed (but the last) by ``x_t <- ddim_step(x_t, x0, t_now, t_next)``. Deterministic
    given x_T (``noise`` is not drawn).

    Args:
        denoise: see :data:`StepDenoise`.
        x_T: the starting noise, N x C x h x w.
        schedule: ``t -> log_snr``.
        steps: network calls T (dynamic inference: any T >= 1).
        td: the asymmetric time difference.
        start: the time of the first step (1: pure noise, as Alg. 2; below 1 the step grid
            is scaled into [0, start], x_T is used as it is).
        self_condition: pass each step's x0 estimate to the next call as ``x0_prev``.
        noise: unused (the signature of :class:`GaussianSampler`).
        callback: see :data:`StepCallback`.

    Returns:
        the last prediction (the output).
    """
    def update(x_t, x0, ls_now, ls_next, t_next):
        return ddim_step(x_t, x0, ls_now, ls_next)

    return denoising_loop(denoise, x_T, schedule, steps, update, td=td, start=start,
                          self_condition=self_condition, callback=callback)


def sample_ddpm(denoise: StepDenoise, x_T: torch.Tensor, schedule: LogSNRSchedule, steps: int,
                *, td: float = 1.0, start: float = 1.0, self_condition: bool = False,
                noise: Noise | None = None, callback: StepCallback | None = None
                ) -> torch.Tensor:
    """DDP Algorithm 2's loop with the ancestral update (:func:`ddpm_step`, the Gaussian
    posterior q(x_next | x_t, x0)): as :func:`sample_ddim`, but each update but the last
    draws fresh noise ``noise(x_t.shape)`` (None: ``torch.randn_like``); an update to
    t_next = 0 draws none."""
    def update(x_t, x0, ls_now, ls_next, t_next):
        eps = None
        if t_next > 0:
            eps = noise(x_t.shape) if noise is not None else torch.randn_like(x_t)
        return ddpm_step(x_t, x0, ls_now, ls_next, eps)

    return denoising_loop(denoise, x_T, schedule, steps, update, td=td, start=start,
                          self_condition=self_condition, callback=callback)


class GaussianSampler(Protocol):
    """The signature every :data:`SAMPLERS` entry has (see :func:`sample_ddim`)."""

    def __call__(self, denoise: StepDenoise, x_T: torch.Tensor, schedule: LogSNRSchedule,
                 steps: int, *, td: float = 1.0, start: float = 1.0,
                 self_condition: bool = False, noise: Noise | None = None,
                 callback: StepCallback | None = None) -> torch.Tensor: ...


SAMPLERS: dict[str, GaussianSampler] = {
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
}
"""DDP's samplers by the name ``model.diffusion.sampler`` takes. Adding one: a function with
the signature of :func:`sample_ddim`, an entry here, its name in ``DiffusionConfig.sampler``
and a test against its closed form."""


MapStep = Callable[..., tuple[torch.Tensor, torch.Tensor]]
"""``denoise_step(features, x_t, log_snr, x0_prev) -> (prediction, x0)``: the map decoder on
(repeated) image features and the prediction's re-encoding (``DDP.denoise_step``, or
``step.onnx`` in the onnxruntime model); ``x0_prev`` as in :data:`StepDenoise`."""


def sample_map(denoise_step: MapStep, feat: torch.Tensor, channels: int,
               schedule: LogSNRSchedule, steps: int, *, sampler: str = "ddim", td: float = 1.0,
               randsteps: int = 1, seeds: Sequence[int] | None = None, start: float = 1.0,
               self_condition: bool = False, callback: StepCallback | None = None
               ) -> torch.Tensor:
    """DDP's sampling on precomputed image features: the seeded starting noise, ``randsteps``
    starts per image, then the sampler ``SAMPLERS[sampler]``. The one sampling path of
    ``DDP.sample_steps`` and the onnxruntime model (:mod:`densediff.deploy`), so both draw the
    same noise.

    Args:
        denoise_step: see :data:`MapStep`; called on ``feat`` repeated ``randsteps`` times per
            image (image-major).
        feat: B x C x h x w features.
        channels: channels of the encoded map.
        schedule, steps, td, start, self_condition: as :func:`sample_ddim`.
        sampler: a key of :data:`SAMPLERS`.
        randsteps: noise starts per image (R).
        seeds: one seed per image (:func:`~densediff.diffusion.noise.generators`, on
            ``feat``'s device): the image's noise then does not depend on the batch it is in.
            None: the global RNG.
        callback: ``callback(step, prediction)`` with each prediction as B x R x ...

    Returns:
        the last prediction, B x R x ... (the output).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}")
    b, _, h, w = feat.shape
    r = randsteps
    gens = generators(seeds, feat.device, b)
    # noise and updates in at least float32, also when the network runs in bf16 (autocast)
    work = torch.promote_types(feat.dtype, torch.float32)
    x_T = seeded_normal((b * r, channels, h, w), gens, feat.device, work)
    feat_r = feat.repeat_interleave(r, dim=0)  # image-major: (b r)

    def per_image(pred: torch.Tensor) -> torch.Tensor:
        return pred.view(b, r, *pred.shape[1:])

    last = SAMPLERS[sampler](
        lambda x, ls, x0_prev: denoise_step(feat_r, x, ls, x0_prev), x_T, schedule, steps,
        td=td, start=start, self_condition=self_condition,
        noise=lambda shape: seeded_normal(shape, gens, feat.device, work),
        callback=None if callback is None else lambda s, pred: callback(s, per_image(pred)))
    return per_image(last)


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


def sample_discrete(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    x_T: torch.Tensor, transition: DiscreteTransition, steps: int, *,
                    renoise: str = "free", noise: Noise | None = None,
                    callback: StepCallback | None = None) -> torch.Tensor:
    """DDPS Algorithm 2: stride sampling of a categorical diffusion.

    With the transition's forward process (DDPS App. A Eq. 1, one step
    ``q(x_t | x_{t-1}) = Cat(x_t; x_{t-1} Q_t)``; Eq. 2, the marginal
    ``q(x_t | x_0) = Cat(x_t; x_0 Qbar_t)``, ``Qbar_t = Q_1 ... Q_t``) and posterior (Eq. 3,
    ``q(x_s | x_t, x_0) = q(x_t | x_s) q(x_s | x_0) / q(x_t | x_0)``):

    1. x_T ~ q(x_T), the stationary distribution (the caller draws it: :func:`sample_prior`);
    2. for the stride times t_1 = T > t_2 > ... > t_n >= 1
       (:func:`~densediff.diffusion.transitions.stride_times`, ``n = steps`` up to repeats):
       x0 logits ``l = denoise(x_t, t)`` (with classifier-free guidance: :func:`guided`);
    3. unless last, re-noise to the next time s = t_{k+1}: ``free``
       ``x_s ~ q(x_s | argmax l)`` (Eq. 2; the official sampler) or ``posterior``
       ``x_s ~ q(x_s | x_t, x0_hat)``, Eq. 3 averaged over ``x0_hat ~ softmax(l)``.

    Args:
        denoise: ``(x_t, t) -> x0 logits`` on the states x_t (B x h x w) and the noise levels
            t (B integers in 1..T).
        x_T: B x h x w states drawn from q(x_T).
        transition: the categorical forward process and posterior (T = its ``timesteps``).
        steps: denoiser calls, 1..T.
        renoise: ``free`` or ``posterior``.
        noise: ``shape -> uniform (0, 1) noise`` for every re-noising draw (seeded by the
            caller, e.g. per image with :func:`~densediff.diffusion.noise.seeded_uniform`);
            None: ``torch.rand``.
        callback: ``callback(step, logits)`` with each step's B x K x h x w logits.

    Returns:
        the last step's logits (the output).
    """
    if renoise not in ("free", "posterior"):
        raise ValueError(f"unknown re-noising {renoise!r}; expected free or posterior")
    draw = noise if noise is not None else (
        lambda size: torch.rand(*size, device=transition.abar.device))
    times = stride_times(transition.timesteps, steps)
    x_t = x_T
    for k, t in enumerate(times):
        logits = denoise(x_t, torch.full((x_t.shape[0],), t, device=x_t.device))
        if callback is not None:
            callback(k, logits)
        if k == len(times) - 1:
            break
        s = times[k + 1]
        if renoise == "free":
            probs = transition.q_probs(logits.argmax(1), s)
        else:
            probs = transition.posterior(x_t, logits.float().softmax(1), s, t)
        x_t = sample_categorical(probs, draw(probs.shape))
    return logits
