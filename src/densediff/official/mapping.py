"""Tensor names and layouts: official DDP (mmseg 0.x fork + mmcls) -> densediff.

Every official key is rewritten by the first matching rule of :func:`rename`; a few tensors
also change layout:

- Swin ``attn.w_msa.qkv`` (mmseg: one ``3C x C`` linear, rows ``[q; k; v]``, as its
  ``WindowMSA`` reshapes to ``(3, heads, C / heads)``) -> the three transformers projections;
- Swin patch merging (``downsample.reduction`` / ``downsample.norm``): mmseg gathers each 2x2
  neighbourhood with ``nn.Unfold``, so its ``4C`` input channels are ordered ``c * 4 + p`` with
  ``p = 2 * dh + dw`` (kernel position, row-major). transformers (as the original Swin)
  concatenates the four sub-grids ``(dh, dw) = (0,0), (1,0), (0,1), (1,1)``, so its channels
  are ``k * C + c`` with ``k = dh + 2 * dw``. :func:`unfold_to_concat` permutes columns (and
  the norm's entries) from the first order to the second;
- Swin ``relative_position_index`` buffers are derived from the window size: dropped.

The official BEV models (``encoders.camera.*``, ``decoder.*``, ``heads.map.*``; the camera + LiDAR
one also ``encoders.lidar.*``, ``fuser.*``) convert into ``model.bev.arch: bevfusion`` by
:func:`bev_rules` (see the comment above it), which
reuse the Swin and DDP rules under the BEV prefixes.

transformers renamed its Swin parameters between major versions (v4: ``attention.self.query``,
``attention.output.dense``, ``intermediate.dense``, ``output.dense``; v5:
``attention.q_proj`` ... ``o_proj``, ``mlp.fc1``/``fc2``, ``attention.relative_position_bias``).
:data:`SWIN_NAMINGS` holds both; :func:`swin_naming` picks the one the installed model uses,
and every conversion ends in a strict comparison with the model's own keys.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping

import torch

from densediff.errors import CheckpointError

Tensor = torch.Tensor

SWIN_NAMINGS: dict[str, dict[str, str]] = {
    "v5": {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj",
           "proj": "attention.o_proj",
           "table": "attention.relative_position_bias.relative_position_bias_table",
           "fc1": "mlp.fc1", "fc2": "mlp.fc2"},
    "v4": {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
           "proj": "attention.output.dense",
           "table": "attention.self.relative_position_bias_table",
           "fc1": "intermediate.dense", "fc2": "output.dense"},
}
"""transformers' Swin block names by major version (blocks are
``encoder.model.swin.encoder.layers.<i>.blocks.<j>.<name>``)."""

_SWIN_BLOCK = "encoder.model.swin.encoder.layers.{i}.blocks.{j}."


def swin_naming(model_keys: Collection[str]) -> dict[str, str]:
    """The entry of :data:`SWIN_NAMINGS` whose names the model's state dict uses."""
    probe = _SWIN_BLOCK.format(i=0, j=0)
    for naming in SWIN_NAMINGS.values():
        if f"{probe}{naming['q']}.weight" in model_keys:
            return naming
    raise CheckpointError("the installed transformers names its Swin parameters in a way "
                          "densediff does not know (expected transformers 4.x or 5.x)")


def unfold_to_concat(t: Tensor) -> Tensor:
    """Patch-merging channels from mmseg's unfold order (``c * 4 + p``, ``p = 2 dh + dw``) to
    the concatenation order (``k * C + c``, ``k = dh + 2 dw``) along the last dimension."""
    c = t.shape[-1] // 4
    grouped = t.reshape(*t.shape[:-1], c, 4)  # [..., c, p]
    # k = 0..3 is (dh, dw) = (0,0), (1,0), (0,1), (1,1): unfold positions p = 0, 2, 1, 3
    return grouped[..., [0, 2, 1, 3]].transpose(-1, -2).reshape(t.shape)


Rule = tuple[re.Pattern, Callable[[re.Match, Tensor], list[tuple[str, Tensor]]]]


def _to(name: str) -> Callable[[re.Match, Tensor], list[tuple[str, Tensor]]]:
    """A rule action: rename to ``name`` (``{1}``... are the pattern's groups)."""
    return lambda m, t: [(name.format(*m.groups()), t)]


def _drop(m: re.Match, t: Tensor) -> list[tuple[str, Tensor]]:
    return []


def _common_rules() -> list[Rule]:
    """Neck, heads, DDP modules: the same for every backbone."""
    r = re.compile
    return [
        (r(r"neck\.0\.(lateral|fpn)_convs\.(\d+)\.conv\.weight"), _to("neck.{0}_convs.{1}.0.weight")),
        (r(r"neck\.0\.(lateral|fpn)_convs\.(\d+)\.gn\.(weight|bias)"), _to("neck.{0}_convs.{1}.1.{2}")),
        (r(r"neck\.1\.down\.conv\.weight"), _to("neck.merge.0.weight")),
        (r(r"neck\.1\.down\.gn\.(weight|bias)"), _to("neck.merge.1.{0}")),
        (r(r"auxiliary_head\.convs\.(\d+)\.conv\.weight"), _to("aux_head.convs.{0}.0.weight")),
        (r(r"auxiliary_head\.convs\.(\d+)\.bn\.(\w+)"), _to("aux_head.convs.{0}.1.{1}")),
        (r(r"auxiliary_head\.conv_seg\.(weight|bias)"), _to("aux_head.conv_seg.{0}")),
        (r(r"embedding_table\.weight"), _to("map_encoding.embedding.weight")),
        (r(r"transform\.conv\.(weight|bias)"), _to("fuse.{0}")),
        (r(r"time_mlp\.(0\.weights|[13]\.weight|[13]\.bias)"), _to("time_mlp.{0}")),
        (r(r"decode_head\.conv_seg\.(weight|bias)"), _to("decoder.conv_seg.{0}")),
        (r(r"decode_head\.encoder\.layers\.(\d+)\.attentions\.0\.(\w+)\.(weight|bias)"),
         _to("decoder.layers.{0}.attn.{1}.{2}")),
        (r(r"decode_head\.encoder\.layers\.(\d+)\.ffns\.0\.layers\.0\.0\.(weight|bias)"),
         _to("decoder.layers.{0}.ffn.0.{1}")),
        (r(r"decode_head\.encoder\.layers\.(\d+)\.ffns\.0\.layers\.1\.(weight|bias)"),
         _to("decoder.layers.{0}.ffn.2.{1}")),
        (r(r"decode_head\.encoder\.layers\.(\d+)\.norms\.0\.(weight|bias)"),
         _to("decoder.layers.{0}.norm1.{1}")),
        (r(r"decode_head\.encoder\.layers\.(\d+)\.norms\.1\.(weight|bias)"),
         _to("decoder.layers.{0}.norm2.{1}")),
        (r(r"decode_head\.encoder\.layers\.(\d+)\.time_mlp\.1\.(weight|bias)"),
         _to("decoder.layers.{0}.time_mlp.1.{1}")),
    ]


def _swin_rules(naming: Mapping[str, str]) -> list[Rule]:
    r = re.compile
    block = "encoder.model.swin.encoder.layers.{0}.blocks.{1}."

    def qkv(m: re.Match, t: Tensor) -> list[tuple[str, Tensor]]:
        i, j, kind = m.groups()
        q, k, v = t.chunk(3, dim=0)
        prefix = block.format(i, j)
        return [(f"{prefix}{naming[n]}.{kind}", x) for n, x in zip("qkv", (q, k, v))]

    def merging(m: re.Match, t: Tensor) -> list[tuple[str, Tensor]]:
        i, kind, what = m.groups()
        return [(f"encoder.model.swin.encoder.layers.{i}.downsample.{kind}.{what}",
                 unfold_to_concat(t))]

    return [
        (r(r"backbone\.patch_embed\.projection\.(weight|bias)"),
         _to("encoder.model.swin.embeddings.patch_embeddings.projection.{0}")),
        (r(r"backbone\.patch_embed\.norm\.(weight|bias)"),
         _to("encoder.model.swin.embeddings.norm.{0}")),
        (r(r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.norm1\.(weight|bias)"),
         _to(block + "layernorm_before.{2}")),
        (r(r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.norm2\.(weight|bias)"),
         _to(block + "layernorm_after.{2}")),
        (r(r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.relative_position_bias_table"),
         _to(block + naming["table"])),
        (r(r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.relative_position_index"), _drop),
        (r(r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.qkv\.(weight|bias)"), qkv),
        (r(r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.proj\.(weight|bias)"),
         _to(block + naming["proj"] + ".{2}")),
        (r(r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.0\.0\.(weight|bias)"),
         _to(block + naming["fc1"] + ".{2}")),
        (r(r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.1\.(weight|bias)"),
         _to(block + naming["fc2"] + ".{2}")),
        (r(r"backbone\.stages\.(\d+)\.downsample\.(reduction|norm)\.(weight|bias)"), merging),
        (r(r"backbone\.norm(\d)\.(weight|bias)"), _stage_norm),
    ]


def _stage_norm(m: re.Match, t: Tensor) -> list[tuple[str, Tensor]]:
    """mmseg/mmcls ``backbone.norm<i>`` -> transformers ``hidden_states_norms.stage<i+1>``."""
    i, what = m.groups()
    return [(f"encoder.model.hidden_states_norms.stage{int(i) + 1}.{what}", t)]


def _convnext_rules() -> list[Rule]:
    r = re.compile
    stages = "encoder.model.encoder.stages."
    return [
        (r(r"backbone\.downsample_layers\.0\.0\.(weight|bias)"),
         _to("encoder.model.embeddings.patch_embeddings.{0}")),
        (r(r"backbone\.downsample_layers\.0\.1\.(weight|bias)"),
         _to("encoder.model.embeddings.layernorm.{0}")),
        (r(r"backbone\.downsample_layers\.([123])\.([01])\.(weight|bias)"),
         _to(stages + "{0}.downsampling_layer.{1}.{2}")),
        (r(r"backbone\.stages\.(\d+)\.(\d+)\.gamma"),
         _to(stages + "{0}.layers.{1}.layer_scale_parameter")),
        (r(r"backbone\.stages\.(\d+)\.(\d+)\.depthwise_conv\.(weight|bias)"),
         _to(stages + "{0}.layers.{1}.dwconv.{2}")),
        (r(r"backbone\.stages\.(\d+)\.(\d+)\.norm\.(weight|bias)"),
         _to(stages + "{0}.layers.{1}.layernorm.{2}")),
        (r(r"backbone\.stages\.(\d+)\.(\d+)\.pointwise_conv([12])\.(weight|bias)"),
         _to(stages + "{0}.layers.{1}.pwconv{2}.{3}")),
        (r(r"backbone\.norm(\d)\.(weight|bias)"), _stage_norm),
    ]


def convert_state(official: Mapping[str, Tensor], backbone: str,
                  model_state: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """Rename and re-lay-out an official DDP state dict for a densediff model, strictly.

    Args:
        official: the official ``state_dict`` (mmseg names; or the BEV camera model's
            BEVFusion names, converted by :func:`bev_rules`).
        backbone: ``swin`` or ``convnext``.
        model_state: the densediff model's own ``state_dict()`` (names and shapes to meet).
        source: the file, for messages.

    Returns:
        A state dict with exactly the model's keys and shapes, tensors in the model's dtypes.

    Raises:
        CheckpointError: one line listing every official key no rule uses, every model key
            left without a tensor, and every shape that differs.
    """
    if any(k.startswith(BEV_PREFIXES) for k in official):  # the BEV camera model (swin)
        return convert_bev_state(official, model_state, source)
    naming = swin_naming(model_state) if backbone == "swin" else {}
    rules = (_swin_rules(naming) if backbone == "swin" else _convnext_rules()) + _common_rules()
    return apply_rules(official, rules, model_state, source)


def apply_rules(official: Mapping[str, Tensor], rules: list[Rule],
                model_state: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """Rename ``official`` by the first matching rule of each key, then check strictly against
    ``model_state`` (see :func:`convert_state`: returns and raises as it does)."""
    out: dict[str, Tensor] = {}
    unused: list[str] = []
    for key, tensor in official.items():
        for pattern, action in rules:
            m = pattern.fullmatch(key)
            if m:
                out.update(action(m, tensor))
                break
        else:
            unused.append(key)
    missing = sorted(k for k in model_state if k not in out)
    extra = sorted(k for k in out if k not in model_state)
    shapes = sorted(k for k in out if k in model_state
                    and tuple(out[k].shape) != tuple(model_state[k].shape))
    problems = []
    for what, keys in (("official keys with no place in the model", unused),
                       ("model keys the checkpoint does not fill", missing),
                       ("converted keys the model does not have", extra),
                       ("shapes that differ", shapes)):
        if keys:
            problems.append(f"{len(keys)} {what} ({', '.join(keys[:4])}"
                            f"{', ...' if len(keys) > 4 else ''})")
    if problems:
        raise CheckpointError(f"{source}: does not convert strictly: {'; '.join(problems)}")
    return {k: out[k].to(model_state[k].dtype) for k in model_state}


# ------------------------------------------------------------------------------------------
# the official BEV camera model (BEVFusion layout)
#
# BEV camera model: the official DDP BEV camera model (BEVFusion layout) -> densediff's
# ``model.bev.arch: bevfusion`` model (:mod:`densediff.encoders.bevfusion`).
#
# The official ``DDP(BEVFusion)`` model has ``encoders.camera.{backbone, neck, vtransform}``,
# ``decoder.{backbone, neck}``, ``heads.map`` and DDP's ``transform`` / ``embedding_table`` /
# ``time_mlp``. Rules, in order:
#
# - ``encoders.camera.backbone.*``: mmdet's Swin, named as mmseg's: the segmentation Swin rules
#   above (q/k/v split, patch-merging channel order, stage norms
#   ``norm1..3`` -> ``hidden_states_norms.stage2..4``; ``out_indices`` 1, 2, 3 so no ``norm0``);
# - ``encoders.camera.neck.*`` (GeneralizedLSSFPN) -> ``neck.*`` (same sub-names);
# - ``encoders.camera.vtransform.{depthnet, downsample}.*`` -> ``view.lift.*``; its
#   ``frustum``, ``dx``, ``bx``, ``nx`` are parameters derived from the config (image size,
#   bounds): dropped, like Swin's ``relative_position_index``;
# - ``decoder.backbone.*`` / ``decoder.neck.*`` (GeneralizedResNet / LSSFPN; the camera + LiDAR
#   model's SECOND / SECONDFPN) -> ``view.backbone.*`` / ``view.neck.*``;
# - the camera + LiDAR model: ``encoders.lidar.backbone.*`` (SparseEncoder; spconv 1.x weights
#   ``(k0, k1, k2, in, out)``, kept as they are) -> ``view.lidar.backbone.*``, ``fuser.*``
#   (ConvFuser) -> ``view.fuser.*`` (:mod:`densediff.encoders.bevfusion_lidar`);
# - ``heads.map.encoder.layers.*`` and ``heads.map.conv_seg.*``: the segmentation head rules
#   (``decode_head.*``), under ``decoder.head.*`` (densediff resamples to the output grid in
#   ``decoder.transform``, which has no parameters);
# - ``transform.conv``, ``embedding_table``, ``time_mlp``: the segmentation DDP rules.

BEV_PREFIXES = ("encoders.", "fuser.", "heads.map.", "decoder.backbone.", "decoder.neck.")
"""Top-level names of the official BEV (BEVFusion) models; no segmentation checkpoint has them."""


def _under(action, old: str, new: str):
    """``action`` with output names starting ``old`` moved under ``new``."""
    def moved(m: re.Match, t: Tensor) -> list[tuple[str, Tensor]]:
        return [(new + k.removeprefix(old) if k.startswith(old) else k, v)
                for k, v in action(m, t)]
    return moved


def bev_rules(naming: Mapping[str, str]) -> list[Rule]:
    """The rules of the comment above (``naming``: transformers' Swin names)."""
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
        (r(r"encoders\.lidar\.backbone\.(.+)"), _to("view.lidar.backbone.{0}")),
        (r(r"fuser\.(.+)"), _to("view.fuser.{0}")),
    ]


def convert_bev_state(official: Mapping[str, Tensor], model_state: Mapping[str, Tensor],
                      source: str) -> dict[str, Tensor]:
    """:func:`convert_state` for the official BEV camera model (BEVFusion layout):
    exactly the model's keys and shapes, or one :class:`~densediff.errors.CheckpointError`
    line listing every unused, missing and mis-shaped key."""
    return apply_rules(official, bev_rules(swin_naming(model_state)), model_state, source)
