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
           "Segmentor", "build_base", "build_bev_model", "build_depth_model",
           "build_segmentation_model"]


def _norm(cfg: Config) -> dict:
    return {"mean": cfg.data.mean, "std": cfg.data.std}


def build_segmentation_model(cfg: Config, num_classes: int) -> nn.Module:
    """``task: segmentation``: ``model.type`` ``segmentor`` (:class:`Segmentor`), ``ddp``
    (:class:`DDP`) or ``ddps`` (:class:`DDPS` on the base of :func:`build_base`, which fills in
    ``cfg.model.ddps.base_config`` when it is unset, so the run's config is self-contained).

    The model builders are the one place that reads the run config: every model gets the
    model section ``cfg.model`` and, by keyword, the few data facts it needs."""
    model_cfg, ignore = cfg.model, cfg.data.ignore_index
    if model_cfg.type == "ddps":
        return DDPS(model_cfg, num_classes, build_base(cfg, num_classes), ignore_index=ignore)
    seg_cls = DDP if model_cfg.type == "ddp" else Segmentor
    return seg_cls(model_cfg, num_classes, ignore_index=ignore, **_norm(cfg))


def build_depth_model(cfg: Config, num_classes: int = 1) -> nn.Module:
    """``task: depth``: :class:`DepthDDP` (``model.type: ddp``) or :class:`Depther`
    (``num_classes`` is the one depth channel)."""
    depth = cfg.data.depth
    depth_cls = DepthDDP if cfg.model.type == "ddp" else Depther
    return depth_cls(cfg.model, ignore_index=cfg.data.ignore_index, min_depth=depth.min_depth,
                     max_depth=depth.max_depth, **_norm(cfg))


def build_bev_model(cfg: Config, num_classes: int) -> nn.Module:
    """``task: bev``: :class:`BEVDDP` (``model.type: ddp``) or :class:`BEVSegmentor`
    (``num_classes``: the map classes)."""
    bev_cls = BEVDDP if cfg.model.type == "ddp" else BEVSegmentor
    return bev_cls(cfg.model, num_classes, bev=cfg.data.bev, ignore_index=cfg.data.ignore_index,
                   **_norm(cfg))


def build_base(cfg: Config, num_classes: int) -> nn.Module:
    """The base segmentor of a DDPS config.

    With ``model.ddps.base_config`` unset, the checkpoint (or run folder) ``model.ddps.base``
    is read: its config is stored in ``base_config`` and its weights are loaded. Otherwise the
    architecture is built from ``base_config`` and the weights are expected from the DDPS
    checkpoint the caller loads next. The base's ``pretrained`` source is never read.
    """
    from densediff.utils.checkpoint import load_into, load_weights, resolve_weights

    ddps_cfg = cfg.model.ddps
    weights = path = None
    if ddps_cfg.base_config is None:
        path = resolve_weights(ddps_cfg.base, "model.ddps.base")
        weights, base_dict = load_weights(path)
        ddps_cfg.base_config = base_dict
    base_cfg = config_from_dict(ddps_cfg.base_config, source="model.ddps.base_config")
    if base_cfg.model.type == "ddps":
        raise ConfigError("model.ddps.base: the base must be a segmentor or ddp model, not ddps")
    if base_cfg.task != cfg.task:
        raise ConfigError(f"model.ddps.base: the base is a {base_cfg.task} model, not a "
                          f"{cfg.task} model")
    names = base_cfg.data.class_names
    if names is not None and len(names) != num_classes:
        raise ConfigError(f"model.ddps.base: the base segmentor has {len(names)} classes but the "
                          f"data has {num_classes}")
    base_cfg.model.encoder.pretrained = None
    base = build_segmentation_model(base_cfg, num_classes)
    if weights is not None:
        load_into(base, weights, source=path)
    return base
