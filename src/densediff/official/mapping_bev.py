"""Tensor names: the official DDP BEV camera model (BEVFusion layout) -> densediff's
``model.bev.arch: bevfusion`` model (:mod:`densediff.encoders.bevfusion`).

The official ``DDP(BEVFusion)`` model has ``encoders.camera.{backbone, neck, vtransform}``,
``decoder.{backbone, neck}``, ``heads.map`` and DDP's ``transform`` / ``embedding_table`` /
``time_mlp``. Rules, in order:

- ``encoders.camera.backbone.*``: mmdet's Swin, named as mmseg's: the segmentation Swin rules
  of :mod:`densediff.official.mapping` (q/k/v split, patch-merging channel order, stage norms
  ``norm1..3`` -> ``hidden_states_norms.stage2..4``; ``out_indices`` 1, 2, 3 so no ``norm0``);
- ``encoders.camera.neck.*`` (GeneralizedLSSFPN) -> ``neck.*`` (same sub-names);
- ``encoders.camera.vtransform.{depthnet, downsample}.*`` -> ``view.lift.*``; its
  ``frustum``, ``dx``, ``bx``, ``nx`` are parameters derived from the config (image size,
  bounds): dropped, like Swin's ``relative_position_index``;
- ``decoder.backbone.*`` / ``decoder.neck.*`` (GeneralizedResNet / LSSFPN) -> ``view.backbone.*``
  / ``view.neck.*``;
- ``heads.map.encoder.layers.*`` and ``heads.map.conv_seg.*``: the segmentation head rules
  (``decode_head.*``), under ``decoder.head.*`` (densediff resamples to the output grid in
  ``decoder.transform``, which has no parameters);
- ``transform.conv``, ``embedding_table``, ``time_mlp``: the segmentation DDP rules.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from densediff.official.mapping import (
    Rule,
    _common_rules,
    _drop,
    _swin_rules,
    _to,
    apply_rules,
    swin_naming,
)

Tensor = torch.Tensor

BEV_PREFIXES = ("encoders.", "fuser.", "heads.map.", "decoder.backbone.", "decoder.neck.")
"""Top-level names of the official BEV (BEVFusion) models; no segmentation checkpoint has them."""


def _under(action, old: str, new: str):
    """``action`` with output names starting ``old`` moved under ``new``."""
    def moved(m: re.Match, t: Tensor) -> list[tuple[str, Tensor]]:
        return [(new + k.removeprefix(old) if k.startswith(old) else k, v)
                for k, v in action(m, t)]
    return moved


def bev_rules(naming: Mapping[str, str]) -> list[Rule]:
    """The rules of the module docstring (``naming``: transformers' Swin names)."""
    r = re.compile
    rules: list[Rule] = []
    for pattern, action in _swin_rules(naming) + _common_rules():
        src = pattern.pattern
        if src.startswith(r"backbone\."):
            rules.append((r(r"encoders\.camera\." + src), action))
        elif src.startswith(r"decode_head\."):
            rules.append((r(r"heads\.map\." + src.removeprefix(r"decode_head\.")),
                          _under(action, "decoder.", "decoder.head.")))
        elif not src.startswith((r"neck\.", r"auxiliary_head\.")):  # DDP's own modules
            rules.append((pattern, action))
    vt = r"encoders\.camera\.vtransform\."
    return rules + [
        (r(r"encoders\.camera\.neck\.((?:lateral|fpn)_convs\.\d+\.(?:conv|bn)\.\w+)"),
         _to("neck.{0}")),
        (r(vt + r"(frustum|dx|bx|nx)"), _drop),
        (r(vt + r"((?:depthnet|downsample)\..+)"), _to("view.lift.{0}")),
        (r(r"decoder\.(backbone|neck)\.(.+)"), _to("view.{0}.{1}")),
    ]


def convert_bev_state(official: Mapping[str, Tensor], model_state: Mapping[str, Tensor],
                      source: str) -> dict[str, Tensor]:
    """:func:`~densediff.official.mapping.convert_state` for the official BEV camera model:
    exactly the model's keys and shapes, or one :class:`~densediff.errors.CheckpointError`
    line listing every unused, missing and mis-shaped key."""
    return apply_rules(official, bev_rules(swin_naming(model_state)), model_state, source)
