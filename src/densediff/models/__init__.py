"""Segmentation models: the discriminative :class:`Segmentor` and the diffusion :class:`DDP`."""

from __future__ import annotations

from torch import nn

from densediff.config import Config
from densediff.models.ddp import DDP
from densediff.models.segmentor import FeatureSegmentor, Segmentor

__all__ = ["DDP", "FeatureSegmentor", "Segmentor", "build_model"]


def build_model(cfg: Config, num_classes: int) -> nn.Module:
    """``cfg.model.type``: ``segmentor`` or ``ddp``."""
    if cfg.model.type == "ddp":
        return DDP(cfg, num_classes)
    return Segmentor(cfg, num_classes)
