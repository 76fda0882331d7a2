"""Models: for segmentation the discriminative :class:`Segmentor`, the diffusion :class:`DDP`,
and the :class:`DDPS` mask prior on a frozen base segmentor; for depth the discriminative
:class:`Depther` and :class:`DepthDDP`; for BEV maps :class:`BEVSegmentor` and
:class:`BEVDDP`."""

from __future__ import annotations

from torch import nn

from densediff.config import Config, config_from_dict
from densediff.errors import ConfigError
from densediff.models.bev import BEVDDP, BEVSegmentor
from densediff.models.ddp import DDP
from densediff.models.ddps import DDPS
from densediff.models.depth import DepthDDP, Depther
from densediff.models.segmentor import FeatureSegmentor, Segmentor

__all__ = ["BEVDDP", "BEVSegmentor", "DDP", "DDPS", "DepthDDP", "Depther", "FeatureSegmentor",
           "Segmentor", "build_base", "build_model"]


def build_model(cfg: Config, num_classes: int) -> nn.Module:
    """``cfg.model.type``: ``segmentor``, ``ddp`` or ``ddps``; with ``task: depth`` the
    depth models (``num_classes`` is then 1, the depth channel); with ``task: bev`` the BEV
    models (``num_classes`` = the map classes).

    For ``ddps`` the base segmentor is built too (:func:`build_base`); this fills in
    ``cfg.model.ddps.base_config`` when it is unset, so the run's config is self-contained.
    """
    if cfg.task == "depth":
        return DepthDDP(cfg) if cfg.model.type == "ddp" else Depther(cfg)
    if cfg.task == "bev":
        return (BEVDDP if cfg.model.type == "ddp" else BEVSegmentor)(cfg, num_classes)
    if cfg.model.type == "ddp":
        return DDP(cfg, num_classes)
    if cfg.model.type == "ddps":
        return DDPS(cfg, num_classes, build_base(cfg, num_classes))
    return Segmentor(cfg, num_classes)


def build_base(cfg: Config, num_classes: int) -> nn.Module:
    """The base segmentor of a DDPS config.

    With ``model.ddps.base_config`` unset, the checkpoint (or run folder) ``model.ddps.base``
    is read: its config is stored in ``base_config`` and its weights are loaded. Otherwise the
    architecture is built from ``base_config`` and the weights are expected from the DDPS
    checkpoint the caller loads next. The base's ``pretrained`` source is never read.
    """
    from densediff.utils.checkpoint import load_into, load_weights, resolve_weights

    d = cfg.model.ddps
    weights = path = None
    if d.base_config is None:
        path = resolve_weights(d.base, "model.ddps.base")
        weights, base_dict = load_weights(path)
        d.base_config = base_dict
    base_cfg = config_from_dict(d.base_config, source="model.ddps.base_config")
    if base_cfg.model.type == "ddps":
        raise ConfigError("model.ddps.base: the base must be a segmentor or ddp model, not ddps")
    names = base_cfg.data.class_names
    if names is not None and len(names) != num_classes:
        raise ConfigError(f"model.ddps.base: the base segmentor has {len(names)} classes but the "
                          f"data has {num_classes}")
    base_cfg.model.encoder.pretrained = None
    base = build_model(base_cfg, num_classes)
    if weights is not None:
        load_into(base, weights, source=path)
    return base
