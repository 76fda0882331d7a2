"""The discriminative segmentor: image encoder (+ FPN merge neck) -> head, plus an aux head.

This is the "non-diffusion baseline" of both papers and the base segmentor that DDPS refines.
Diffusion models reuse :meth:`Segmentor.extract` (the encoder runs once) and the same
train/predict contract: ``forward_train(img, label) -> losses``, ``predict_logits(img)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from densediff.config import Config
from densediff.decoders.heads import ConvHead, FCNHead
from densediff.encoders import build_encoder
from densediff.encoders.neck import FPNMerge
from densediff.tasks.segmentation import ce_loss


class Segmentor(nn.Module):
    """Encoder -> FPN + multi-stage merging (one 1/4 map) -> conv head; FCN aux head in training.

    Args:
        cfg: the resolved run config (``cfg.model`` is read).
        num_classes: number of classes K (ignore pixels carry ``cfg.data.ignore_index``).
    """

    def __init__(self, cfg: Config, num_classes: int):
        super().__init__()
        m = cfg.model
        self.num_classes = num_classes
        self.ignore_index = cfg.data.ignore_index
        self.avg_non_ignore = m.avg_non_ignore
        self.encoder = build_encoder(m.encoder, cfg.data.mean, cfg.data.std)
        self.neck = FPNMerge(self.encoder.out_channels, m.neck.channels, m.neck.num_groups)
        self.head = ConvHead(m.neck.channels, m.head.channels, m.head.num_convs, num_classes,
                             m.head.dropout)
        # A zero-weight aux head is not built: its parameters would get no gradient, which
        # DistributedDataParallel rejects.
        use_aux = m.aux_head.enabled and m.aux_head.weight > 0
        self.aux_weight = m.aux_head.weight if use_aux else 0.0
        self.aux_head = (FCNHead(m.neck.channels, m.aux_head.channels, num_classes,
                                 m.aux_head.dropout) if use_aux else None)

    def extract(self, img: torch.Tensor) -> torch.Tensor:
        """Image features at stride 4 (B x C x H/4 x W/4); run once per image."""
        return self.neck(self.encoder(img))

    def forward_train(self, img: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
        feat = self.extract(img)
        losses = {"loss_ce": ce_loss(self.head(feat), label, self.ignore_index,
                                     self.avg_non_ignore)}
        if self.aux_head is not None:
            losses["loss_aux"] = self.aux_weight * ce_loss(
                self.aux_head(feat), label, self.ignore_index, self.avg_non_ignore)
        losses["loss"] = sum(losses.values())
        return losses

    def predict_logits(self, img: torch.Tensor) -> torch.Tensor:
        """Class logits B x K x H x W at the input resolution."""
        logits = self.head(self.extract(img))
        return F.interpolate(logits, size=img.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, img: torch.Tensor, label: torch.Tensor | None = None):
        # DistributedDataParallel calls forward(); route to the training or inference path.
        return self.forward_train(img, label) if label is not None else self.predict_logits(img)


def build_model(cfg: Config, num_classes: int) -> Segmentor:
    return Segmentor(cfg, num_classes)
