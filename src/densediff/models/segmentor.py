"""The discriminative segmentor: image encoder (+ FPN merge neck) -> head, plus an aux head.

This is the "non-diffusion baseline" of both papers and the base segmentor that DDPS refines.
With ``head.type: deformable`` it is DDP's non-diffusion twin: the same map decoder, without the
noisy map and the time conditioning. :class:`FeatureSegmentor` holds what every segmentation
model here shares (encoder + neck run once, the FCN aux head); see :mod:`densediff.models.ddp`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from densediff.config import DataConfig, HeadConfig, ModelConfig
from densediff.criteria.segmentation import ce_loss
from densediff.decoders.deformable import DeformableDecoder
from densediff.decoders.heads import ConvHead, FCNHead
from densediff.encoders import build_encoder
from densediff.encoders.neck import FPNMerge
from densediff.models.interface import MapModel, Trajectory

MEAN, STD = (DataConfig.model_fields[k].default for k in ("mean", "std"))
"""The default input normalisation (``data.mean`` / ``data.std``: ImageNet, 0..255 pixels)."""


class FeatureSegmentor(MapModel):
    """Encoder -> FPN + multi-stage merging (one stride-4 map), and the FCN aux head.

    Args:
        model_cfg: the model section (``model.encoder``, ``neck``, ``aux_head``,
            ``avg_non_ignore`` are read).
        num_classes: number of classes K.
        ignore_index: the label of ignore pixels (``data.ignore_index``).
        mean, std: the input normalisation (``data.mean``, ``data.std``).
        view: builds the module that turns the neck's per-image features into the task's
            feature map (BEV: the camera-to-BEV encoder; it needs ``out_channels``), called
            right after the neck is built; None: the neck's features are used as they are.
    """

    def __init__(self, model_cfg: ModelConfig, num_classes: int, *, ignore_index: int = 255,
                 mean: Sequence[float] = MEAN, std: Sequence[float] = STD,
                 view: Callable[[], nn.Module] | None = None):
        super().__init__()
        m = model_cfg
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.avg_non_ignore = m.avg_non_ignore
        self.encoder = build_encoder(m.encoder, mean, std)
        self.neck = FPNMerge(self.encoder.out_channels, m.neck.channels, m.neck.num_groups)
        self.view = view() if view is not None else None
        self.feat_channels = m.neck.channels if self.view is None else self.view.out_channels
        """Channels of :meth:`extract`'s features."""
        # A zero-weight aux head is not built: its parameters would get no gradient, which
        # DistributedDataParallel rejects.
        use_aux = m.aux_head.enabled and m.aux_head.weight > 0
        self.aux_weight = m.aux_head.weight if use_aux else 0.0
        self.aux_head = (FCNHead(m.neck.channels, m.aux_head.channels, num_classes,
                                 m.aux_head.dropout) if use_aux else None)

    def extract(self, img: torch.Tensor) -> torch.Tensor:
        """Image features at stride 4 (B x C x H/4 x W/4); run once per image."""
        return self.neck(self.encoder(img))

    def ce(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """CE on logits upsampled to the label size (mmseg semantics)."""
        return ce_loss(logits, label, self.ignore_index, self.avg_non_ignore)

    def add_aux_loss(self, losses: dict[str, torch.Tensor], feat: torch.Tensor,
                     label: torch.Tensor) -> dict[str, torch.Tensor]:
        """Add the weighted aux CE (on the image features alone) and the total ``loss``."""
        if self.aux_head is not None:
            losses["loss_aux"] = self.aux_weight * self.ce(self.aux_head(feat), label)
        losses["loss"] = sum(losses.values())
        return losses


def build_head(head: HeadConfig, in_channels: int, num_classes: int,
               time_channels: int | None = None) -> nn.Module:
    """The conv head, or the deformable map decoder (with FiLM time input when
    ``time_channels`` is given)."""
    if head.type == "conv":
        return ConvHead(in_channels, head.channels, head.num_convs, num_classes, head.dropout,
                        head.out_kernel)
    return DeformableDecoder(in_channels, num_classes, head.channels, head.num_layers,
                             head.num_heads, head.num_points, head.num_levels, head.ffn_channels,
                             time_channels=time_channels, dropout=head.dropout,
                             out_kernel=head.out_kernel)


class Segmentor(FeatureSegmentor):
    """Discriminative model: features -> head (conv, or the deformable twin of DDP).
    Arguments: those of :class:`FeatureSegmentor` (``model.head`` is read too)."""

    def __init__(self, model_cfg: ModelConfig, num_classes: int, **kwargs):
        super().__init__(model_cfg, num_classes, **kwargs)
        self.head = build_head(model_cfg.head, model_cfg.neck.channels, num_classes)

    def forward_train(self, img: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
        feat = self.extract(img)
        return self.add_aux_loss({"loss_ce": self.ce(self.head(feat), label)}, feat, label)

    def sample_steps(self, feat: torch.Tensor, steps: int = 0, **settings) -> Trajectory:
        """The head's class logits as a one-step trajectory (``settings`` are ignored)."""
        return self.one_call(self.head(feat), steps)
