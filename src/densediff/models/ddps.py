"""DDPS: a denoising-diffusion mask prior that refines a frozen base segmentor (Lai et al. 2023).

Two stages (paper §3.2, Fig. 3):

1. the **base segmentor** (any densediff ``segmentor`` or ``ddp`` checkpoint) runs once, frozen
   and in eval mode; its pre-classifier features at the 1/4 feature grid are the condition,
   and its logits are kept (the "initial prediction" and the steps = 0 output);
2. the **denoiser** (:class:`~densediff.decoders.unet.UNet` on concat[condition, encoded noisy
   mask], then dropout and a new 1x1 classifier) predicts x0 logits from the noisy mask.

Pieces kept apart: the discrete forward process and posterior live in
:mod:`densediff.diffusion.transitions`, the bit codec's Gaussian schedule and sampler are
DDP's (:mod:`densediff.diffusion.schedules`, :mod:`densediff.diffusion.samplers`).

- training, Algorithm 1: :meth:`DDPS.forward_train` (noise targets of Table 3b, CE or VLB loss
  of Table 3d, two-stage training, condition dropout);
- inference, Algorithm 2: :meth:`DDPS.sample_steps` (stride sampling, free or posterior
  re-noising, classifier-free guidance; every step's logits returned);
- the Table 7 control (``model.ddps.diffusion: false``): the same UNet as extra head layers,
  no diffusion (:meth:`DDPS.control_logits`);
- codecs: ``resize`` (discrete diffusion on the label map at 1/4, logits upsampled bilinearly)
  and ``bits`` (analog bits with Gaussian diffusion, App. A / Table 8).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from densediff.config import Config
from densediff.decoders.unet import UNet
from densediff.diffusion.encodings import AnalogBits
from densediff.diffusion.samplers import sample, seeded_normal, seeded_uniform
from densediff.diffusion.schedules import alpha_sigma, get_schedule
from densediff.diffusion.transitions import DiscreteTransition, sample_categorical, stride_times
from densediff.models.ddp import DDP, Trajectory
from densediff.tasks.segmentation import ce_loss

__all__ = ["DDPS", "Condition"]

BASE_SEED = 0
"""A DDP base samples from this fixed per-image seed: its output does not depend on batching."""


@dataclass
class Condition:
    """The frozen base's output for a batch: pre-classifier ``features`` (B x C x h x w) and
    ``logits`` (B x K x h x w), both on the feature grid (1/4 of the input)."""

    features: torch.Tensor
    logits: torch.Tensor


class DDPS(nn.Module):
    """The DDPS model; see the module doc. Modules: ``base`` (frozen), ``unet``, ``conv_seg``
    (the new classifier) and, for the ``resize`` codec, the frozen random ``state_embed``.

    Args:
        cfg: the run config (``cfg.model.ddps``, ``cfg.data.ignore_index``).
        num_classes: K.
        base: the base segmentor, weights loaded (see :func:`densediff.models.build_model`).
    """

    def __init__(self, cfg: Config, num_classes: int, base: nn.Module):
        super().__init__()
        d = cfg.model.ddps
        self.cfg = d
        self.num_classes = num_classes
        self.ignore_index = cfg.data.ignore_index
        self.avg_non_ignore = cfg.model.avg_non_ignore
        self.base = base.eval().requires_grad_(False)
        cond_channels = self._base_classifier().in_channels
        if d.codec == "resize":
            self.transition = DiscreteTransition(num_classes, d.timesteps, d.transition,
                                                 d.schedule, d.mask_share)
            # frozen random embedding of the states, as the official (never trained)
            self.register_buffer("state_embed", torch.randn(self.transition.num_states,
                                                            d.embed_channels))
            map_channels = d.embed_channels
        else:
            self.bits = AnalogBits(num_classes, d.bit_scale, self.ignore_index)
            self.log_snr = get_schedule("cosine")
            map_channels = self.bits.channels
        u = d.unet
        self.unet = UNet(cond_channels + map_channels, u.out_channels, u.dim, u.dim_mults,
                         u.groups, u.heads, u.dim_head)
        self.dropout = nn.Dropout2d(u.dropout) if u.dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(u.out_channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)
        self.iteration = 0  # set by the trainer (two-stage training)

    # ---------------------------------------------------------------- model contract

    default_steps = property(lambda self: self.cfg.steps)
    min_steps = 0  # steps = 0: the base segmentor's own prediction
    # stride sampling visits distinct trained noise levels (the bit codec's time is continuous)
    max_steps = property(lambda self: 1 if not self.cfg.diffusion
                         else self.cfg.timesteps if self.cfg.codec == "resize" else None)
    max_steps_reason = property(lambda self: "the trained timesteps" if self.cfg.diffusion
                                else "the no-diffusion control makes one call")
    accumulation = False

    def train(self, mode: bool = True) -> DDPS:
        super().train(mode)
        self.base.eval()  # frozen: no dropout, no BatchNorm statistics updates
        return self

    def _base_classifier(self) -> nn.Conv2d:
        """The base's final 1x1 classifier, whose input is the condition."""
        return self.base.decoder.conv_seg if isinstance(self.base, DDP) else self.base.head.conv_seg

    def set_iteration(self, iteration: int) -> None:
        """Called by the trainer before every optimizer step (two-stage training)."""
        self.iteration = iteration

    def forward(self, img: torch.Tensor, label: torch.Tensor | None = None):
        return self.forward_train(img, label) if label is not None else self.predict_logits(img)

    # ---------------------------------------------------------------- the two stages

    @torch.no_grad()
    def extract(self, img: torch.Tensor) -> Condition:
        """Stage 1: run the frozen base once. The condition is the input of its classifier
        (read with a forward pre-hook, so any head works); a DDP base samples its default
        steps from fixed noise and its features are those of the last step."""
        captured: list[torch.Tensor] = []
        hook = self._base_classifier().register_forward_pre_hook(
            lambda _m, args: captured.append(args[0]))
        try:
            feat = self.base.extract(img)
            if isinstance(self.base, DDP):
                b = img.shape[0]
                traj = self.base.sample_steps(feat, self.cfg.base_steps or self.base.default_steps,
                                              seeds=[BASE_SEED] * b)
                logits = traj.scores(self.base.accumulation)
                features = captured[-1].view(b, -1, *captured[-1].shape[1:]).mean(1)
            else:
                logits = self.base.head(feat)
                features = captured[-1]
        finally:
            hook.remove()
        return Condition(features.float(), logits.float())

    def denoise(self, features: torch.Tensor, x_in: torch.Tensor, time: torch.Tensor
                ) -> torch.Tensor:
        """Stage 2, one denoiser call: x0 logits (B x K x h x w) from the condition features,
        the encoded noisy mask ``x_in`` and the time input (one value per image)."""
        out = self.unet(torch.cat([features, x_in], 1), time)
        return self.conv_seg(self.dropout(out))

    def guided(self, features: torch.Tensor, x_in: torch.Tensor, time: torch.Tensor,
               guidance: float) -> torch.Tensor:
        """Classifier-free guidance (paper §3.4): ``(s + 1) l_c - s l_u`` with the
        unconditional branch on zeroed features; s = 0 is one plain call."""
        if guidance == 0:
            return self.denoise(features, x_in, time)
        both = self.denoise(torch.cat([features, torch.zeros_like(features)]),
                            torch.cat([x_in, x_in]), torch.cat([time, time]))
        cond, uncond = both.chunk(2)
        return cfg_combine(cond, uncond, guidance)

    def embed(self, states: torch.Tensor) -> torch.Tensor:
        """``resize`` codec: states (B x h x w) -> B x embed_channels x h x w."""
        return self.state_embed[states].permute(0, 3, 1, 2)

    def discrete_time(self, t: torch.Tensor) -> torch.Tensor:
        """The UNet's time input for noise level t in 1..T: ``1000 t / T`` (a model means the
        same by it whatever T)."""
        return t.float() * (1000.0 / self.cfg.timesteps)

    def control_logits(self, features: torch.Tensor, guidance: float = 0.0) -> torch.Tensor:
        """The no-diffusion control of the paper's Table 7 (``model.ddps.diffusion: false``):
        one UNet call on the condition features with an all-zero mask input and a fixed time
        input (0), i.e. the UNet and classifier as extra layers of the base's decode head, with
        the same parameters as DDPS."""
        b, _, h, w = features.shape
        channels = self.cfg.embed_channels if self.cfg.codec == "resize" else self.bits.channels
        x_in = features.new_zeros(b, channels, h, w)
        return self.guided(features, x_in, features.new_zeros(b), guidance)

    # ---------------------------------------------------------------- training (Algorithm 1)

    def _single_step(self) -> bool:
        return self.training and self.iteration < self.cfg.single_step_iters

    def _noise_target(self, cond: Condition, features: torch.Tensor, small: torch.Tensor
                      ) -> torch.Tensor:
        """x0 to be noised (Table 3b), class indices on the feature grid."""
        target = self.cfg.target
        if target == "initial_prediction":
            return cond.logits.argmax(1)
        if target == "ground_truth":
            bad = (small < 0) | (small >= self.num_classes)
            rand = torch.randint_like(small, self.num_classes)
            return torch.where(bad, rand, small)  # ignore pixels: a random class
        with torch.no_grad():  # first prediction: one step from pure noise (Alg. 1)
            b, _, h, w = features.shape
            if self.cfg.codec == "resize":
                T = self.cfg.timesteps
                x_T = self._prior_sample(b, h, w, None, features.device)
                t = torch.full((b,), T, device=features.device)
                logits = self.denoise(features, self.embed(x_T), self.discrete_time(t))
            else:
                x_T = torch.randn(b, self.bits.channels, h, w, device=features.device)
                logits = self.denoise(features, x_T, self.log_snr(torch.ones(b, device=x_T.device)))
            return logits.argmax(1)

    def forward_train(self, img: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
        """Algorithm 1: the condition from the frozen base; x0 = the noise target; t uniform in
        1..T (only T in the single-step stage); x_t ~ q(x_t | x0); the denoiser's x0 logits,
        upsampled, scored with CE against the full-resolution GT (or the VLB + aux CE)."""
        cond = self.extract(img)
        features = cond.features
        b, _, h, w = features.shape
        if self.cfg.cond_drop > 0:  # the unconditional branch for guidance
            keep = (torch.rand(b, device=features.device) >= self.cfg.cond_drop).float()
            features = features * keep.view(b, 1, 1, 1)
        if not self.cfg.diffusion:  # Table 7 control: no noisy mask, CE on the GT
            loss = ce_loss(self.control_logits(features), label, self.ignore_index,
                           self.avg_non_ignore)
            return {"loss_ce": loss, "loss": loss}
        small = F.interpolate(label[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
        x0 = self._noise_target(cond, features, small)
        losses: dict[str, torch.Tensor] = {}
        if self.cfg.codec == "resize":
            T = self.cfg.timesteps
            t = (torch.full((b,), T, device=img.device) if self._single_step()
                 else torch.randint(1, T + 1, (b,), device=img.device))
            q = self.transition.q_probs(x0, t)
            x_t = sample_categorical(q, torch.rand_like(q))
            logits = self.denoise(features, self.embed(x_t), self.discrete_time(t))
            ce = ce_loss(logits, label, self.ignore_index, self.avg_non_ignore)
            if self.cfg.loss == "vlb":
                losses["loss_vlb"] = self.vlb(logits, x_t, small, t)
                losses["loss_ce"] = self.cfg.vlb_ce_weight * ce
            else:
                losses["loss_ce"] = ce
        else:
            t = (torch.ones(b, device=img.device) if self._single_step()
                 else torch.empty(b, device=img.device).uniform_(0.0, 0.999))
            log_snr = self.log_snr(t)
            alpha, sigma = (v.view(b, 1, 1, 1) for v in alpha_sigma(log_snr))
            x_t = alpha * self.bits(x0) + sigma * torch.randn(b, self.bits.channels, h, w,
                                                              device=img.device)
            logits = self.denoise(features, x_t, log_snr)
            losses["loss_ce"] = ce_loss(logits, label, self.ignore_index, self.avg_non_ignore)
        losses["loss"] = sum(losses.values())
        return losses

    def vlb(self, logits: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor
            ) -> torch.Tensor:
        """The variational bound terms of Eq. 4 at noise level t (one per image), on the
        feature grid: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 1 and
        -log p(x0 | x_1) for t = 1, with p from the predicted x0 distribution. Ignore pixels,
        and pixels whose x_t is impossible under x0 (possible when x0 != the noise target),
        are left out; the mean is over the rest."""
        tr = self.transition
        valid = (x0 >= 0) & (x0 < self.num_classes)
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

    # ---------------------------------------------------------------- inference (Algorithm 2)

    def _prior_sample(self, b: int, h: int, w: int, gens, device) -> torch.Tensor:
        prior = self.transition.prior_probs().view(1, -1, 1, 1).expand(b, -1, h, w)
        return sample_categorical(prior, seeded_uniform(prior.shape, gens, device))

    @torch.no_grad()
    def sample_steps(self, cond: Condition, steps: int, *, seeds: Sequence[int] | None = None,
                     guidance: float | None = None, renoise: str | None = None) -> Trajectory:
        """Algorithm 2 from the base's condition: ``steps`` denoiser calls, every step's logits
        returned (R = 1 start per image). ``steps = 0`` returns the base's logits.

        ``resize`` codec: the noise levels are :func:`~densediff.diffusion.transitions.stride_times`;
        x_T is drawn from the stationary distribution; between steps the prediction is
        re-noised to the next level with q(x_s | argmax x0_hat) (``free``) or the posterior
        q(x_s | x_t, x0_hat) (``posterior``). ``bits`` codec: DDIM (Alg. 3 of DDP) with the
        analog bits of argmax x0_hat, td = 1.

        Args:
            cond: from :meth:`extract` (reuse it for several step counts).
            steps: denoiser calls (0 .. timesteps).
            seeds: one per image: its noise does not depend on the batch. None: global RNG.
            guidance, renoise: default to ``model.ddps``.
        """
        d = self.cfg
        guidance = d.guidance if guidance is None else guidance
        renoise = d.renoise if renoise is None else renoise
        if steps == 0:
            return Trajectory([cond.logits[:, None]])
        if not d.diffusion:
            if steps != 1:
                raise ValueError(f"the no-diffusion control makes one call, got steps={steps}")
            return Trajectory([self.control_logits(cond.features, guidance)[:, None]])
        features = cond.features
        b, _, h, w = features.shape
        dev = features.device
        if seeds is not None and len(seeds) != b:
            raise ValueError(f"got {len(seeds)} seeds for a batch of {b}")
        gens = None
        if seeds is not None:
            gens = [torch.Generator(device=dev).manual_seed(int(s)) for s in seeds]
        if d.codec == "bits":
            shape = (b, self.bits.channels, h, w)
            preds = sample(lambda x, ls: self.guided(features, x, ls, guidance),
                           lambda lg: self.bits(lg.argmax(1)), seeded_normal(shape, gens, dev),
                           self.log_snr, steps, td=1.0, sampler="ddim")
            return Trajectory([p[:, None] for p in preds])
        tr = self.transition
        times = stride_times(d.timesteps, steps)
        x = self._prior_sample(b, h, w, gens, dev)
        preds = []
        for k, t in enumerate(times):
            tt = torch.full((b,), t, device=dev)
            logits = self.guided(features, self.embed(x), self.discrete_time(tt), guidance)
            preds.append(logits[:, None])
            if k == len(times) - 1:
                break
            s = times[k + 1]
            if renoise == "free":
                probs = tr.q_probs(logits.argmax(1), s)
            else:
                probs = tr.posterior(x, logits.float().softmax(1), s, t)
            x = sample_categorical(probs, seeded_uniform(probs.shape, gens, dev))
        return Trajectory(preds)

    def predict_logits(self, img: torch.Tensor, steps: int | None = None, **kwargs
                       ) -> torch.Tensor:
        """B x K x H x W logits of the last step at the input size (the generic inference
        path: slide window, multi-scale + flip). ``kwargs``: ``seeds``, ``guidance``,
        ``renoise``."""
        traj = self.sample_steps(self.extract(img), self.cfg.steps if steps is None else steps,
                                 **kwargs)
        return F.interpolate(traj.scores(False), size=img.shape[-2:], mode="bilinear",
                             align_corners=False)

    @torch.no_grad()
    def decoder_step(self, cond: Condition) -> torch.Tensor:
        """One denoiser call at the middle noise level (for ``densediff bench``)."""
        b, _, h, w = cond.features.shape
        if not self.cfg.diffusion:
            return self.control_logits(cond.features, self.cfg.guidance)
        if self.cfg.codec == "bits":
            ls = self.log_snr(torch.full((b,), 0.5, device=cond.features.device))
            return self.guided(cond.features, torch.randn(b, self.bits.channels, h, w,
                                                          device=ls.device), ls, self.cfg.guidance)
        t = torch.full((b,), max(1, self.cfg.timesteps // 2), device=cond.features.device)
        x = self._prior_sample(b, h, w, None, cond.features.device)
        return self.guided(cond.features, self.embed(x), self.discrete_time(t), self.cfg.guidance)


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on logits: ``(s + 1) l_c - s l_u`` (paper §3.4)."""
    return (scale + 1) * cond - scale * uncond
