"""Optimizer parameter groups and the learning-rate schedule (mmseg/mmcv semantics).

Weight decay is applied to weight matrices and conv kernels only. It is switched off for

- every parameter of a normalization layer (BatchNorm, GroupNorm, LayerNorm, InstanceNorm,
  LocalResponseNorm and any module whose class name ends in ``Norm`` / ``Norm2d``, e.g. RMSNorm);
- every 1-D parameter (biases, layer-scale gammas);
- position embeddings and relative position bias tables (names containing ``pos_embed``,
  ``position_embedding``, ``relative_position_bias_table``, ``pos_block``, ``cls_token``,
  ``mask_token``).

This covers mmseg's ``paramwise_cfg`` for Swin/SegFormer/ConvNeXt (``norm``, ``pos_block``,
``absolute_pos_embed``, ``relative_position_bias_table`` with ``decay_mult=0``) and goes one
step further for biases (``bias_decay_mult=0``), the common practice for AdamW.

Parameters outside ``model.encoder`` get ``lr * head_lr_mult`` (mmseg ``head`` ``lr_mult``);
with ``train.map_lr_mult != 1`` the DDP map path (``map_encoding.*``, ``fuse.*``) gets
``lr * head_lr_mult * map_lr_mult`` in groups of its own.
"""


from __future__ import annotations

import math

from torch import nn

from densediff.config import TrainConfig

MAP_PATH = ("map_encoding.", "fuse.")
"""Name prefixes of the DDP map path (``train.map_lr_mult``)."""

NO_DECAY_NAMES = ("pos_embed", "position_embedding", "relative_position_bias_table",
                  "pos_block", "cls_token", "mask_token")
"""Name fragments of parameters that get no weight decay whatever their shape."""

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
               nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, _NORM_TYPES) or name.endswith("Norm") or name.endswith("Norm2d")


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the trainable parameters of ``model`` that get weight decay 0 (see module doc)."""
    out: set[str] = set()
    for mod_name, module in model.named_modules():
        norm = _is_norm(module)
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if norm or p.ndim <= 1 or any(s in full for s in NO_DECAY_NAMES):
                out.add(full)
    return out


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW parameter groups: {encoder, rest[, map path]} x {decay, no decay}; empty groups
    are dropped.

    Each group carries ``name`` and ``lr_mult`` (read by :func:`set_lr`); frozen parameters
    (``requires_grad=False``) are left out.
    """
    no_decay = no_decay_names(model)
    split_map = cfg.map_lr_mult != 1.0
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = ("encoder" if name.startswith("encoder.") else
                "map" if split_map and name.startswith(MAP_PATH) else "head")
        groups.setdefault((part, name in no_decay), []).append(p)
    mult = {"encoder": 1.0, "head": cfg.head_lr_mult, "map": cfg.head_lr_mult * cfg.map_lr_mult}
    order = {"encoder": 0, "head": 1, "map": 2}
    out = []
    for (part, nd), params in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])):
        out.append({
            "name": f"{part}_{'no_decay' if nd else 'decay'}",
            "params": params,
            "lr_mult": mult[part],
            "weight_decay": 0.0 if nd else cfg.weight_decay,
        })
    return out


def build_optimizer(model: nn.Module, cfg: TrainConfig):
    """AdamW over :func:`param_groups` with ``cfg.betas``; lr is set per iteration by set_lr."""
    import torch

    groups = param_groups(model, cfg)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def scheduled_lr(base_lr: float, it: int, cfg: TrainConfig) -> float:
    """Learning rate at iteration ``it`` (0-based, before that iteration's update) under
    ``cfg.lr_schedule`` (:data:`LR_SCHEDULES`: :func:`poly_lr`, :func:`cosine_lr` or
    :func:`cyclic_lr`), times mmcv's linear warmup factor (:func:`warmup_factor`)."""
    try:
        policy = LR_SCHEDULES[cfg.lr_schedule]
    except KeyError:
        raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}; expected one of "
                         f"{tuple(LR_SCHEDULES)}") from None
    return policy(base_lr, it, cfg) * warmup_factor(it, cfg)


def poly_lr(base_lr: float, it: int, cfg: TrainConfig) -> float:
    """``train.lr_schedule: poly``: mmcv ``PolyLrUpdaterHook`` (``by_epoch=False``), no warmup::

        lr = (base_lr - min_lr) * (1 - it / iters) ** poly_power + min_lr
    """
    return (base_lr - cfg.min_lr) * (1 - it / cfg.iters) ** cfg.poly_power + cfg.min_lr


def cosine_lr(base_lr: float, it: int, cfg: TrainConfig) -> float:
    """``train.lr_schedule: cosine``: mmcv ``CosineAnnealingLrUpdaterHook`` (the official depth
    recipe), no warmup::

        lr = min_lr + (base_lr - min_lr) * (1 + cos(pi * it / iters)) / 2
    """
    return cfg.min_lr + (base_lr - cfg.min_lr) * (1 + math.cos(math.pi * it / cfg.iters)) / 2


def cyclic_lr(base_lr: float, it: int, cfg: TrainConfig) -> float:
    """``train.lr_schedule: cyclic``: mmcv ``CyclicLrUpdaterHook`` with its defaults (BEVFusion
    and the official BEV recipe), no warmup: ``base_lr *`` :func:`cyclic_ratio` with ratios
    :data:`CYCLIC_LR` (10, 1e-4), 40% of the iterations up. ``min_lr`` is not used."""
    return base_lr * cyclic_ratio(it, cfg.iters, CYCLIC_LR)


def warmup_factor(it: int, cfg: TrainConfig) -> float:
    """mmcv's linear warmup, a factor on the scheduled lr::

        1 - (1 - it / warmup_iters) * (1 - warmup_ratio)   if it < warmup_iters, else 1
    """
    if it < cfg.warmup_iters:
        return 1 - (1 - it / cfg.warmup_iters) * (1 - cfg.warmup_ratio)
    return 1.0


LR_SCHEDULES = {"poly": poly_lr, "cosine": cosine_lr, "cyclic": cyclic_lr}
"""``train.lr_schedule`` -> the policy ``f(base_lr, it, cfg)`` (without warmup)."""


CYCLIC_LR = (10.0, 1e-4)
"""mmcv ``CyclicLrUpdaterHook`` default ``target_ratio``."""
CYCLIC_MOMENTUM = (0.85 / 0.95, 1.0)
"""mmcv ``CyclicMomentumUpdaterHook`` default ``target_ratio``."""


def cyclic_ratio(it: int, iters: int, target: tuple[float, float], up: float = 0.4) -> float:
    """mmcv's one-cycle schedule as a factor of the base value: cosine from 1 to ``target[0]``
    over the first ``int(up * iters)`` iterations, then cosine to ``target[1]`` at ``iters``."""
    top = int(up * iters)
    if it < top:
        start, end, f = 1.0, target[0], it / top
    else:
        start, end, f = target[0], target[1], (it - top) / max(1, iters - top)
    return end + (start - end) / 2 * (math.cos(math.pi * min(f, 1.0)) + 1)


def set_lr(optimizer, it: int, cfg: TrainConfig) -> float:
    """Set every group's lr to ``scheduled_lr(cfg.lr * group lr_mult, it)``; returns the base
    lr.
    With ``lr_schedule: cyclic`` AdamW's beta1 cycles the other way (mmcv
    ``CyclicMomentumUpdaterHook`` defaults: ``cyclic_ratio`` with (0.85 / 0.95, 1))."""
    beta1 = cfg.betas[0] * cyclic_ratio(it, cfg.iters, CYCLIC_MOMENTUM)
    for group in optimizer.param_groups:
        group["lr"] = scheduled_lr(cfg.lr * group.get("lr_mult", 1.0), it, cfg)
        if cfg.lr_schedule == "cyclic" and "betas" in group:
            group["betas"] = (beta1, group["betas"][1])
    return scheduled_lr(cfg.lr, it, cfg)
