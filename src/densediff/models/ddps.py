"""DDPS: a denoising-diffusion mask prior that refines a frozen base segmentor (Lai et al. 2023).

Two stages (paper §3.2, Fig. 3):

1. the **base segmentor** (any densediff ``segmentor`` or ``ddp`` checkpoint) runs once, frozen
   and in eval mode; its pre-classifier features at the 1/4 feature grid are the condition,
   and its logits are kept (the "initial prediction" and the steps = 0 output);
2. the **denoiser** (:class:`~densediff.decoders.unet.UNet` on concat[condition, encoded noisy
   mask], then dropout and a new 1x1 classifier) predicts x0 logits from the noisy mask.

What depends on the kind of diffusion is the model's **codec**
(:mod:`densediff.diffusion.codecs`): ``resize``, a :class:`~densediff.diffusion.codecs.DiscreteCodec`
(discrete diffusion on the label map at 1/4, logits upsampled bilinearly; forward process and
posterior in :mod:`densediff.diffusion.transitions`, the stride sampler
:func:`~densediff.diffusion.samplers.sample_discrete`), or ``bits``, a
:class:`~densediff.diffusion.codecs.BitCodec` (analog bits with DDP's Gaussian diffusion,
App. A / Table 8). The model's two algorithms read the same for both:

- training, Algorithm 1: :meth:`DDPS.forward_train` (noise targets of Table 3b, CE or VLB loss
  of Table 3d, two-stage training, condition dropout);
- inference, Algorithm 2: :meth:`DDPS.sample_steps` (stride sampling, free or posterior
  re-noising, classifier-free guidance; every step's logits returned);
- the Table 7 control (``model.ddps.diffusion: false``): the same UNet as extra head layers,
  no diffusion (:meth:`DDPS.control_logits`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from densediff.config import DDPSConfig, ModelConfig
from densediff.criteria.segmentation import ce_loss
from densediff.decoders.unet import UNet
from densediff.diffusion.codecs import BitCodec, DiscreteCodec, MaskCodec
from densediff.diffusion.encodings import AnalogBits
from densediff.diffusion.samplers import GuidableDenoise, guided
from densediff.diffusion.transitions import DiscreteTransition
from densediff.models.ddp import DDP
from densediff.models.interface import MapModel, Trajectory

__all__ = ["DDPS", "Condition", "build_codec"]

BASE_SEED = 0
"""A DDP base samples from this fixed per-image seed: its output does not depend on batching."""


@dataclass
class Condition:
    """The frozen base's output for a batch: pre-classifier ``features`` (B x C x h x w) and
    ``logits`` (B x K x h x w), both on the feature grid (1/4 of the input)."""

    features: torch.Tensor
    logits: torch.Tensor


def build_codec(ddps_cfg: DDPSConfig, num_classes: int, ignore_index: int) -> MaskCodec:
    """The codec of ``model.ddps.codec``: ``resize`` (discrete) or ``bits``."""
    if ddps_cfg.codec == "resize":
        return DiscreteCodec(DiscreteTransition(num_classes, ddps_cfg.timesteps,
                                                ddps_cfg.transition, ddps_cfg.schedule,
                                                ddps_cfg.mask_share), ddps_cfg.embed_channels)
    return BitCodec(AnalogBits(num_classes, ddps_cfg.bit_scale, ignore_index))


class DDPS(MapModel):
    """The DDPS model; see the module doc. Modules: ``base`` (frozen), ``codec`` (for
    ``resize`` with the frozen random ``state_embed``, stored as ``state_embed`` in the
    state dict as before), ``unet`` and ``conv_seg`` (the new classifier).

    Args:
        model_cfg: the model section (``model.ddps``, ``model.avg_non_ignore`` are read).
        num_classes: K.
        base: the base segmentor, weights loaded (see :func:`densediff.models.build_model`).
        ignore_index: the label of ignore pixels.
    """

    def __init__(self, model_cfg: ModelConfig, num_classes: int, base: nn.Module, *,
                 ignore_index: int = 255):
        super().__init__()
        ddps_cfg = model_cfg.ddps
        self.ddps_cfg = ddps_cfg
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.avg_non_ignore = model_cfg.avg_non_ignore
        self.base = base.eval().requires_grad_(False)
        cond_channels = self._base_classifier().in_channels
        self.codec = build_codec(ddps_cfg, num_classes, ignore_index)
        u = ddps_cfg.unet
        self.unet = UNet(cond_channels + self.codec.channels, u.out_channels, u.dim, u.dim_mults,
                         u.groups, u.heads, u.dim_head)
        self.dropout = nn.Dropout2d(u.dropout) if u.dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(u.out_channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)
        self.iteration = 0  # set by the trainer (two-stage training)
        # checkpoints keep the key "state_embed" (the buffer lived on the model before codecs)
        self.register_state_dict_post_hook(_flat_state_embed)
        self.register_load_state_dict_pre_hook(_nested_state_embed)

    # ---------------------------------------------------------------- model contract

    default_steps = property(lambda self: self.ddps_cfg.steps)
    min_steps = 0  # steps = 0: the base segmentor's own prediction
    # stride sampling visits distinct trained noise levels (the bit codec's time is continuous)
    max_steps = property(lambda self: self.codec.max_steps if self.ddps_cfg.diffusion else 1)
    max_steps_reason = property(lambda self: "the trained timesteps" if self.ddps_cfg.diffusion
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
                traj = self.base.sample_steps(feat,
                                              self.ddps_cfg.base_steps or self.base.default_steps,
                                              seeds=[BASE_SEED] * b)
                logits = _scores(traj, self.base.accumulation)
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

    def mask_denoiser(self, features: torch.Tensor) -> GuidableDenoise:
        """:meth:`denoise` with the condition bound, as the samplers take it:
        ``(x_in, time, with_uncond) -> logits``, where ``with_uncond`` adds the unconditional
        branch (zeroed features) to the same call (2B x K x h x w)."""

        def denoise(x_in: torch.Tensor, time: torch.Tensor, with_uncond: bool) -> torch.Tensor:
            if not with_uncond:
                return self.denoise(features, x_in, time)
            return self.denoise(torch.cat([features, torch.zeros_like(features)]),
                                torch.cat([x_in, x_in]), torch.cat([time, time]))

        return denoise

    def guided(self, features: torch.Tensor, x_in: torch.Tensor, time: torch.Tensor,
               guidance: float) -> torch.Tensor:
        """One denoiser call with classifier-free guidance (paper §3.4): ``(s + 1) l_c - s l_u``
        with the unconditional branch on zeroed features; s = 0 is one plain call."""
        return guided(self.mask_denoiser(features), guidance)(x_in, time)

    def control_logits(self, features: torch.Tensor, guidance: float = 0.0) -> torch.Tensor:
        """The no-diffusion control of the paper's Table 7 (``model.ddps.diffusion: false``):
        one UNet call on the condition features with an all-zero mask input and a fixed time
        input (0), i.e. the UNet and classifier as extra layers of the base's decode head, with
        the same parameters as DDPS."""
        b, _, h, w = features.shape
        x_in = features.new_zeros(b, self.codec.channels, h, w)
        return self.guided(features, x_in, features.new_zeros(b), guidance)

    # ---------------------------------------------------------------- training (Algorithm 1)

    def _single_step(self) -> bool:
        return self.training and self.iteration < self.ddps_cfg.single_step_iters

    def _noise_target(self, cond: Condition, features: torch.Tensor, small: torch.Tensor
                      ) -> torch.Tensor:
        """x0 to be noised (Table 3b), class indices on the feature grid."""
        target = self.ddps_cfg.target
        if target == "initial_prediction":
            return cond.logits.argmax(1)
        if target == "ground_truth":
            bad = (small < 0) | (small >= self.num_classes)
            rand = torch.randint_like(small, self.num_classes)
            return torch.where(bad, rand, small)  # ignore pixels: a random class
        with torch.no_grad():  # first prediction: one step from pure noise (Alg. 1)
            b, _, h, w = features.shape
            x_T = self.codec.pure_noise(b, h, w, features.device)
            return self.denoise(features, x_T.x_in, x_T.time).argmax(1)

    def forward_train(self, img: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
        """Algorithm 1: the condition from the frozen base; x0 = the noise target; t uniform in
        1..T (only T in the single-step stage); x_t ~ q(x_t | x0); the denoiser's x0 logits,
        upsampled, scored with CE against the full-resolution GT (or the VLB + aux CE)."""
        ddps_cfg = self.ddps_cfg
        cond = self.extract(img)
        features = cond.features
        b, _, h, w = features.shape
        if ddps_cfg.cond_drop > 0:  # the unconditional branch for guidance
            keep = (torch.rand(b, device=features.device) >= ddps_cfg.cond_drop).float()
            features = features * keep.view(b, 1, 1, 1)
        if not ddps_cfg.diffusion:  # Table 7 control: no noisy mask, CE on the GT
            loss = ce_loss(self.control_logits(features), label, self.ignore_index,
                           self.avg_non_ignore)
            return {"loss_ce": loss, "loss": loss}
        small = F.interpolate(label[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
        x0 = self._noise_target(cond, features, small)
        x_t = self.codec.noise(x0, first_step_only=self._single_step())
        logits = self.denoise(features, x_t.x_in, x_t.time)
        ce = ce_loss(logits, label, self.ignore_index, self.avg_non_ignore)
        if ddps_cfg.loss == "vlb":  # Eq. 5 (a config check keeps it to the discrete codec)
            losses = {"loss_vlb": self.vlb(logits, x_t.x_t, small, x_t.t),
                      "loss_ce": ddps_cfg.vlb_ce_weight * ce}
        else:
            losses = {"loss_ce": ce}
        losses["loss"] = sum(losses.values())
        return losses

    def vlb(self, logits: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor
            ) -> torch.Tensor:
        """The variational bound of Eq. 4 (discrete codec only):
        :meth:`densediff.diffusion.codecs.DiscreteCodec.vlb`."""
        return self.codec.vlb(logits, x_t, x0, t)

    # ---------------------------------------------------------------- inference (Algorithm 2)

    @torch.no_grad()
    def sample_steps(self, cond: Condition, steps: int, *, seeds: Sequence[int] | None = None,
                     guidance: float | None = None, renoise: str | None = None) -> Trajectory:
        """Algorithm 2 from the base's condition: ``steps`` denoiser calls, every step's logits
        returned (R = 1 start per image). ``steps = 0`` returns the base's logits.

        The codec samples (:meth:`~densediff.diffusion.codecs.MaskCodec.sample`): ``resize``,
        :func:`~densediff.diffusion.samplers.sample_discrete` (stride times, x_T from the
        stationary distribution, re-noising with q(x_s | argmax x0_hat) (``free``) or the
        posterior q(x_s | x_t, x0_hat) (``posterior``)); ``bits``, DDIM (Alg. 3 of DDP) with
        the analog bits of argmax x0_hat, td = 1.

        Args:
            cond: from :meth:`extract` (reuse it for several step counts).
            steps: denoiser calls (0 .. timesteps).
            seeds: one per image: its noise does not depend on the batch. None: global RNG.
            guidance, renoise: default to ``model.ddps``.
        """
        ddps_cfg = self.ddps_cfg
        guidance = ddps_cfg.guidance if guidance is None else guidance
        renoise = ddps_cfg.renoise if renoise is None else renoise
        if steps == 0:
            return Trajectory([cond.logits[:, None]], self.output_kind)
        if not ddps_cfg.diffusion:
            if steps != 1:
                raise ValueError(f"the no-diffusion control makes one call, got steps={steps}")
            return Trajectory([self.control_logits(cond.features, guidance)[:, None]],
                              self.output_kind)
        features = cond.features
        b, _, h, w = features.shape
        steps_out: list[torch.Tensor] = []
        self.codec.sample(self.mask_denoiser(features), (b, h, w), steps, guidance=guidance,
                          renoise=renoise, seeds=seeds, device=features.device,
                          callback=lambda _step, logits: steps_out.append(logits[:, None]))
        return Trajectory(steps_out, self.output_kind)

    @torch.no_grad()
    def decoder_step(self, cond: Condition) -> torch.Tensor:
        """One denoiser call at the middle noise level (for ``densediff bench``)."""
        if not self.ddps_cfg.diffusion:
            return self.control_logits(cond.features, self.ddps_cfg.guidance)
        b, _, h, w = cond.features.shape
        x_t = self.codec.middle(b, h, w, cond.features.device)
        return self.guided(cond.features, x_t.x_in, x_t.time, self.ddps_cfg.guidance)


def _scores(traj: Trajectory, accumulation: bool) -> torch.Tensor:
    """B x K x h x w scores whose softmax is the base's output probabilities: the log of the
    accumulated step probabilities, or the last step's logits averaged over starts."""
    out = traj.output(accumulation)
    return out.clamp(min=1e-12).log() if accumulation else out


_CODEC_KEY, _FLAT_KEY = "codec.state_embed", "state_embed"


def _flat_state_embed(module: nn.Module, state_dict, prefix: str, local_metadata) -> None:
    """State-dict hook: ``codec.state_embed`` is saved as ``state_embed`` (the key of
    checkpoints written before the codec was its own module)."""
    if prefix + _CODEC_KEY in state_dict:
        state_dict[prefix + _FLAT_KEY] = state_dict.pop(prefix + _CODEC_KEY)


def _nested_state_embed(module: nn.Module, state_dict, prefix: str, *args) -> None:
    """Load hook, the inverse of :func:`_flat_state_embed`."""
    if prefix + _FLAT_KEY in state_dict:
        state_dict[prefix + _CODEC_KEY] = state_dict.pop(prefix + _FLAT_KEY)
