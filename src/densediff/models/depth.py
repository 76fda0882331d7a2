"""Monocular depth: DDP over a one-channel depth map (paper §4.4, App. B.3), and its twin.

The machinery is DDP's (:mod:`densediff.models.ddp`): encoder + neck once, the deformable map
decoder once per step, the same schedules and sampler. What depth changes, following the
official depth code (reference notes §1.11):

- the map encoding is the normalised depth, ``((d - min)/(max - min) * 2 - 1) * scale``
  (:class:`~densediff.diffusion.encodings.DepthEncoding`, scale 0.1);
- the decoder's one output channel becomes depth through ``relu(x) + min_depth``;
- x0_hat is re-encoded from the predicted depth and clamped to [-scale, scale] at every step;
- the loss is SigLoss (optionally + gradient matching) on valid GT pixels only
  (:mod:`densediff.criteria.depth`);
- the GT is brought to the feature grid by :func:`downsample_depth`, which averages valid
  pixels only, so missing pixels of sparse GT (KITTI) never become targets (the official
  nearest resize turns them into depth 0).

The depth configs also use the official schedule variant (``cosine_unclamped``) and feed t to
the time MLP (``diffusion.time_input: t``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from densediff.config import ModelConfig
from densediff.criteria.depth import gradient_loss, sig_loss, valid_mask
from densediff.diffusion.encodings import DepthEncoding
from densediff.models.ddp import DDP
from densediff.models.interface import Trajectory
from densediff.models.segmentor import FeatureSegmentor, build_head

__all__ = ["DepthDDP", "Depther", "downsample_depth"]


def downsample_depth(depth: torch.Tensor, valid: torch.Tensor, size: tuple[int, int],
                     fallback: float) -> torch.Tensor:
    """Depth B x H x W -> B x 1 x h x w, averaging the ``valid`` pixels of each cell only.

    A cell without valid pixels takes the valid mean of the smallest enclosing cell of a
    coarser grid (the grid halved until one holds valid pixels); an image without any valid
    pixel gets ``fallback``. Dense GT gives the plain area average.
    """
    d = (depth * valid)[:, None].float()
    v = valid[:, None].float()
    s, c = F.adaptive_avg_pool2d(d, size), F.adaptive_avg_pool2d(v, size)
    out = s / c.clamp(min=1e-12)
    empty = c <= 0
    while bool(empty.any()) and max(s.shape[-2:]) > 1:
        s = F.avg_pool2d(s, 2, ceil_mode=True)
        c = F.avg_pool2d(c, 2, ceil_mode=True)
        fill = F.interpolate(s / c.clamp(min=1e-12), size=size, mode="nearest")
        found = F.interpolate(c, size=size, mode="nearest") > 0
        out = torch.where(empty & found, fill, out)
        empty = empty & ~found
    return out.masked_fill(empty, fallback)


class _DepthOutput:
    """What both depth models share: the output activation and the loss."""

    output_kind = "depth"

    def _setup_depth(self, model_cfg: ModelConfig, min_depth: float, max_depth: float,
                     *convs: nn.Conv2d | None) -> None:
        """Store the depth settings and start each output conv's bias at the middle of the
        depth range. (The official bias starts at 0: with ``relu`` on the output, a head whose
        outputs all start negative gets no gradient and never trains, which happened to the
        generated-scene twin here: grad norm 0 from the first iteration.)"""
        self.min_depth, self.max_depth = min_depth, max_depth
        self.loss_cfg = model_cfg.depth_loss
        for conv in convs:
            if conv is not None:
                nn.init.constant_(conv.bias, (min_depth + max_depth) / 2)

    def to_depth(self, raw: torch.Tensor) -> torch.Tensor:
        """Head output -> depth: ``relu(x) + min_depth`` (official ``scale_up=False``)."""
        return F.relu(raw) + self.min_depth

    def depth_losses(self, depth: torch.Tensor, gt: torch.Tensor) -> dict[str, torch.Tensor]:
        """SigLoss (+ weighted gradient matching) of a B x 1 x h x w depth, upsampled
        bilinearly to the GT (B x H x W), on the valid GT pixels."""
        up = F.interpolate(depth, size=gt.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        valid = valid_mask(gt, self.min_depth, self.max_depth)
        lc = self.loss_cfg
        losses = {"loss_depth": sig_loss(up, gt, valid, lc.variance_focus)}
        if lc.gradient_weight > 0:
            losses["loss_grad"] = lc.gradient_weight * gradient_loss(up, gt, valid,
                                                                     lc.gradient_scales)
        return losses

    def add_aux_loss(self, losses: dict[str, torch.Tensor], feat: torch.Tensor,
                     label: torch.Tensor) -> dict[str, torch.Tensor]:
        """The weighted aux depth loss (aux head on the image features) and the total."""
        if self.aux_head is not None:
            aux = self.depth_losses(self.to_depth(self.aux_head(feat)), label)
            losses["loss_aux"] = self.aux_weight * sum(aux.values())
        losses["loss"] = sum(losses.values())
        return losses


class Depther(_DepthOutput, FeatureSegmentor):
    """Discriminative depth model: features -> head (conv, or the deformable twin of DDP) ->
    ``relu + min_depth``. Trained with the same loss as :class:`DepthDDP`.

    Args:
        model_cfg: the model section (as :class:`~densediff.models.segmentor.Segmentor`, and
            ``model.depth_loss``).
        min_depth, max_depth: the depth range in metres (``data.depth``).
        kwargs: ``mean``, ``std`` (and ``ignore_index``) of
            :class:`~densediff.models.segmentor.FeatureSegmentor`.
    """

    def __init__(self, model_cfg: ModelConfig, *, min_depth: float, max_depth: float, **kwargs):
        super().__init__(model_cfg, 1, **kwargs)
        self.head = build_head(model_cfg.head, model_cfg.neck.channels, 1)
        self._setup_depth(model_cfg, min_depth, max_depth, self.head.conv_seg,
                          getattr(self.aux_head, "conv_seg", None))

    def forward_train(self, img: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
        feat = self.extract(img)
        depth = self.to_depth(self.head(feat))
        return self.add_aux_loss(self.depth_losses(depth, label), feat, label)

    def sample_steps(self, feat: torch.Tensor, steps: int = 0, **settings) -> Trajectory:
        """The head's depth as a one-step trajectory (``settings`` are ignored)."""
        return self.one_call(self.to_depth(self.head(feat)), steps)


class DepthDDP(_DepthOutput, DDP):
    """DDP for depth: one-channel map diffusion (see the module docstring). Training is
    :meth:`DDP.forward_train` (Alg. 1 / Alg. 4) with the depth hooks below; sampling is
    :meth:`DDP.sample_steps` (Alg. 2/3), returning a depth :class:`Trajectory`.

    Arguments: those of :class:`Depther` (``model.diffusion`` is read too); the map encoding
    is :class:`~densediff.diffusion.encodings.DepthEncoding` over the depth range."""

    def __init__(self, model_cfg: ModelConfig, *, min_depth: float, max_depth: float, **kwargs):
        super().__init__(model_cfg, 1, map_encoding=lambda: DepthEncoding(
            min_depth, max_depth, model_cfg.diffusion.scale), **kwargs)
        self._setup_depth(model_cfg, min_depth, max_depth, self.decoder.conv_seg,
                          getattr(self.aux_head, "conv_seg", None))

    def denoise(self, feat: torch.Tensor, x_t: torch.Tensor, log_snr: torch.Tensor,
                x0_prev: torch.Tensor | None = None) -> torch.Tensor:
        """The map decoder's output as depth, B x 1 x h x w."""
        return self.to_depth(super().denoise(feat, x_t, log_snr, x0_prev))

    def encode_target(self, label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        valid = valid_mask(label, self.min_depth, self.max_depth)
        middle = (self.min_depth + self.max_depth) / 2
        return self.map_encoding(downsample_depth(label, valid, size, middle))

    def encode_prediction(self, depth: torch.Tensor) -> torch.Tensor:
        """Predicted depth -> x0_hat, clamped to [-scale, scale] (official)."""
        s = self.map_encoding.scale
        return self.map_encoding(depth).clamp(-s, s)

    def task_losses(self, pred: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.depth_losses(pred, label)
