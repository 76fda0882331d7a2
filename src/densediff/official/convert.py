"""Read an official DDP checkpoint (mmseg ``.pth``), recognise it, convert it strictly.

Reading never executes anything from the file: ``torch.load(weights_only=True)`` with only the
plain numpy scalar / dtype types that mmcv/mmseg metadata holds allow-listed (a keep-best hook
stores a numpy float). The released model is recognised from the tensor names and shapes
(backbone family, widths, depths, window, number of classes), plus the metadata's config text
or the file name for the self-aligned fine-tunes, whose tensors are the same as the 160k
models'. The matching shipped config gives the architecture and the test settings; the
converted weights must fill exactly that model (:func:`~densediff.official.mapping.convert_state`).
"""

from __future__ import annotations

import math
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from densediff.config import Config
from densediff.errors import CheckpointError, UserError, one_line
from densediff.limits import MAX_CLASSES_META, MAX_OFFICIAL_BYTES
from densediff.official.catalog import ReleasedModel, match_released
from densediff.official.hub import hub_download, is_hub_uri
from densediff.official.mapping import BEV_PREFIXES, convert_state
from densediff.tasks import build_model, class_info, load_config
from densediff.utils.checkpoint import load_into, save_checkpoint
from densediff.utils.checks import require_file

OFFICIAL_SUFFIXES = (".pth", ".pt", ".bin")
"""File suffixes treated as official (pickle-zip) checkpoints; densediff's own are safetensors."""

_DATASET_BY_CLASSES = {150: "ade20k", 19: "cityscapes", 6: "nuscenes"}
_SWIN_SIZES = {(96, (2, 2, 6, 2)): "tiny", (96, (2, 2, 18, 2)): "small",
               (128, (2, 2, 18, 2)): "base", (192, (2, 2, 18, 2)): "large"}
_CONVNEXT_SIZES = {(96, (3, 3, 9, 3)): "tiny", (96, (3, 3, 27, 3)): "small",
                   (128, (3, 3, 27, 3)): "base", (192, (3, 3, 27, 3)): "large"}


def is_official_source(source: str | os.PathLike) -> bool:
    """An ``hf://`` URI or a ``.pth``/``.pt``/``.bin`` file (not densediff's safetensors)."""
    return is_hub_uri(source) or Path(source).suffix.lower() in OFFICIAL_SUFFIXES


def _numpy_safe_globals() -> list:
    """numpy's scalar reconstructor and the plain dtypes, under their numpy 1 and 2 names."""
    try:
        from numpy._core import multiarray  # numpy 2
    except ImportError:  # numpy 1
        from numpy.core import multiarray
    dtypes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64,
                                          np.int32, np.int16, np.int8, np.uint8, np.bool_)]
    return [multiarray.scalar, (multiarray.scalar, "numpy.core.multiarray.scalar"),
            (multiarray.scalar, "numpy._core.multiarray.scalar"), np.dtype, *dtypes]


def read_official(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, meta)`` of an mmcv/mmseg checkpoint, read without executing anything.

    Accepts ``{"state_dict": ..., "meta": ..., "optimizer": ...}`` (mmcv ``save_checkpoint``)
    or a bare state dict; a ``module.`` prefix (DataParallel) is removed.

    Raises:
        CheckpointError: missing, not a regular file, too large, not a torch zip/pickle file,
            holding Python objects beyond tensors/containers/numpy scalars, or no state dict.
    """
    path = require_file(path, error=CheckpointError)  # missing, a folder, a FIFO ...: named
    size = path.stat().st_size
    if size > MAX_OFFICIAL_BYTES:
        raise CheckpointError(f"{path}: {size / 2**30:.1f} GiB, above the "
                              f"{MAX_OFFICIAL_BYTES >> 30} GiB limit for official checkpoints")
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(_numpy_safe_globals()):
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(e))
        if found:
            what = f" ({found.group(1)})"
            raise CheckpointError(
                f"{path}: refused: it holds Python objects{what} beyond tensors, containers "
                "and numpy scalars; such files can run code when loaded, so densediff never "
                "loads them") from None
        detail = re.search(r"Unpickler error:\s*(.+?)\s*(?:Check the documentation|$)", str(e),
                           flags=re.S)
        raise CheckpointError(f"{path}: corrupt or not a torch checkpoint"
                              + (f" ({one_line(ValueError(detail.group(1)), 120)})" if detail
                                 else "")) from None
    except (RecursionError, MemoryError) as e:
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: nested or large "
                              "beyond limits)") from None
    except Exception as e:  # noqa: BLE001 -- a user file: any failure is one line
        raise CheckpointError(f"{path}: corrupt or not a torch checkpoint ({one_line(e)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a checkpoint (top level is {type(obj).__name__})")
    state = obj.get("state_dict", obj)
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: holds no state_dict")
    clean: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: state_dict entry {str(k)[:80]!r} is not a named tensor")
        clean[k.removeprefix("module.")] = v
    return clean, meta


@dataclass(frozen=True)
class OfficialArch:
    """What an official state dict holds, read from its tensor names and shapes."""

    backbone: str  # swin | convnext
    variant: str  # tiny | small | base | large
    window: int | None  # swin attention window
    num_classes: int
    lidar: bool = False  # BEV: the camera + LiDAR model

    @property
    def dataset(self) -> str | None:
        return _DATASET_BY_CLASSES.get(self.num_classes)


def describe(state: dict[str, torch.Tensor], source: str) -> OfficialArch:
    """Recognise an official DDP segmentation or BEV (camera, camera + LiDAR) state dict.

    Raises:
        CheckpointError: not a DDP checkpoint, or a backbone size that no released model has.
    """
    if is_bev_state(state):
        return _describe_bev(state, source)
    if not any(k.startswith(("decode_head.", "embedding_table")) for k in state):
        raise CheckpointError(f"{source}: not an official DDP segmentation checkpoint (no "
                              "decode_head / embedding_table tensors)")
    for key in ("decode_head.conv_seg.weight", "embedding_table.weight"):
        if key not in state:
            raise CheckpointError(f"{source}: not an official DDP checkpoint ({key} missing)")
    num_classes = int(state["decode_head.conv_seg.weight"].shape[0])
    if "backbone.patch_embed.projection.weight" in state:
        width = int(state["backbone.patch_embed.projection.weight"].shape[0])
        depths = tuple(_count(state, rf"backbone\.stages\.{i}\.blocks\.(\d+)\.norm1\.weight")
                       for i in range(4))
        variant = _SWIN_SIZES.get((width, depths))
        table = state.get("backbone.stages.0.blocks.0.attn.w_msa.relative_position_bias_table")
        side = math.isqrt(int(table.shape[0])) if table is not None else 0
        window = (side + 1) // 2 if side and side * side == table.shape[0] and side % 2 else None
        if variant is None or window is None:
            raise CheckpointError(f"{source}: a Swin of width {width}, depths {list(depths)} and "
                                  "no released size; convert it with --config <your config>")
        return OfficialArch("swin", variant, window, num_classes)
    if "backbone.downsample_layers.0.0.weight" in state:
        width = int(state["backbone.downsample_layers.0.0.weight"].shape[0])
        depths = tuple(_count(state, rf"backbone\.stages\.{i}\.(\d+)\.gamma") for i in range(4))
        variant = _CONVNEXT_SIZES.get((width, depths))
        if variant is None:
            raise CheckpointError(f"{source}: a ConvNeXt of width {width}, depths {list(depths)} "
                                  "and no released size; convert it with --config <your config>")
        return OfficialArch("convnext", variant, None, num_classes)
    raise CheckpointError(f"{source}: unknown backbone (neither mmseg Swin nor mmcls ConvNeXt)")


def is_bev_state(state: dict[str, torch.Tensor]) -> bool:
    """An official BEV (BEVFusion-layout) state dict."""
    return any(k.startswith(BEV_PREFIXES) for k in state)


def _describe_bev(state: dict[str, torch.Tensor], source: str) -> OfficialArch:
    """The released BEV models' layout (Swin-T camera backbone, 6 map classes, time-aware map
    head; with or without the LiDAR branch), else one line saying what differs."""
    lidar = any(k.startswith(("encoders.lidar.", "fuser.")) for k in state)
    if lidar and not {"encoders.lidar.backbone.conv_input.0.weight", "fuser.0.weight"} <= set(
            state):
        raise CheckpointError(f"{source}: an official BEV checkpoint with LiDAR tensors but no "
                              "SparseEncoder input conv or ConvFuser: no released model has "
                              "that layout")
    prefix = "encoders.camera.backbone."
    head = state.get("heads.map.conv_seg.weight")
    if f"{prefix}patch_embed.projection.weight" not in state or head is None:
        raise CheckpointError(f"{source}: an official BEV checkpoint without a Swin camera "
                              "backbone or a map head: no released model has that layout")
    width = int(state[f"{prefix}patch_embed.projection.weight"].shape[0])
    depths = tuple(_count(state, rf"{re.escape(prefix)}stages\.{i}\.blocks\.(\d+)\.norm1\.weight")
                   for i in range(4))
    table = state.get(f"{prefix}stages.0.blocks.0.attn.w_msa.relative_position_bias_table")
    side = math.isqrt(int(table.shape[0])) if table is not None else 0
    window = (side + 1) // 2 if side and side * side == table.shape[0] and side % 2 else None
    if _SWIN_SIZES.get((width, depths)) != "tiny" or window != 7:
        raise CheckpointError(f"{source}: a BEV camera Swin of width {width}, depths "
                              f"{list(depths)}, window {window}: the released model is Swin-T "
                              "(window 7); convert it with --config <your config>")
    if "heads.map.encoder.layers.0.time_mlp.1.weight" not in state:
        raise CheckpointError(f"{source}: its map head has no time input (no "
                              "heads.map.encoder.layers.*.time_mlp): the released config's "
                              "time-aware layers were not used; densediff's BEV DDP needs them")
    return OfficialArch("swin", "tiny", window, int(head.shape[0]), lidar)


def _count(state: dict[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    idx = {int(m.group(1)) for k in state if (m := rx.fullmatch(k))}
    return max(idx) + 1 if idx else 0


def _is_aligned(meta: dict[str, Any], source: str) -> bool:
    """The self-aligned fine-tune: its tensors equal a 160k model's, so the metadata's config
    text (``SelfAlignedDDP``) or the file name decides."""
    text = meta.get("config")
    if isinstance(text, str) and "type=" in text:
        return "SelfAlignedDDP" in text[:1_000_000]
    return "aligned" in Path(source).name


def released_for(arch: OfficialArch, meta: dict[str, Any], source: str) -> ReleasedModel:
    """The released model with this architecture (and fine-tune)."""
    if arch.dataset is None:
        raise CheckpointError(f"{source}: {arch.num_classes} classes: no released model has that "
                              "(ADE20K 150, Cityscapes 19); convert it with --config <your config>")
    aligned = _is_aligned(meta, source)
    entry = match_released(arch.dataset, arch.backbone, arch.variant, aligned, arch.lidar)
    if entry is None:
        raise CheckpointError(f"{source}: no released model is a {arch.dataset} {arch.backbone} "
                              f"{arch.variant}{' aligned' if aligned else ''}; convert it with "
                              "--config <your config>")
    return entry


def _meta_classes(meta: dict[str, Any], num_classes: int):
    """``(names, palette)`` from mmseg metadata when complete and sane, else ``(None, None)``."""
    names, palette = meta.get("CLASSES"), meta.get("PALETTE")
    if not (isinstance(names, (list, tuple)) and len(names) == num_classes <= MAX_CLASSES_META
            and all(isinstance(n, str) and 0 < len(n.strip()) <= 100 for n in names)):
        return None, None
    names = [n.strip() for n in names]  # mmseg's ADE20K table has "bed " with a space
    ok_palette = (isinstance(palette, (list, tuple)) and len(palette) == num_classes
                  and all(isinstance(c, (list, tuple)) and len(c) == 3
                          and all(isinstance(v, (int, np.integer)) and 0 <= v <= 255 for v in c)
                          for c in palette))
    return names, ([[int(v) for v in c] for c in palette] if ok_palette else None)


def _official_config(entry: ReleasedModel | None, given: Config | None,
                     arch: OfficialArch | None, meta: dict[str, Any], source: str) -> Config:
    cfg = given if given is not None else load_config(entry.config)
    cfg.model.encoder.pretrained = None  # every weight comes from the checkpoint
    cfg.train.load_from = None
    if arch is not None and cfg.model.encoder.name == "swin" and arch.window not in (
            None, cfg.model.encoder.window_size or 7):
        raise CheckpointError(f"{source}: Swin window {arch.window}, but the config has "
                              f"model.encoder.window_size={cfg.model.encoder.window_size or 7}")
    names, palette = class_info(cfg)
    meta_names, meta_palette = _meta_classes(meta, len(names))
    cfg.data.class_names = meta_names or list(names)
    cfg.data.palette = meta_palette or [[int(v) for v in c] for c in palette]
    return cfg


def resolve_source(source: str | os.PathLike) -> Path:
    """A local file for an official source (``hf://`` files are downloaded into the cache)."""
    return hub_download(str(source)) if is_hub_uri(source) else Path(source)


def load_official(source: str | os.PathLike, config: str | os.PathLike | None = None
                  ) -> tuple[torch.nn.Module, Config, ReleasedModel | None]:
    """Build the densediff model of an official checkpoint and load its converted weights.

    Args:
        source: an official ``.pth`` file or ``hf://<repo>/<file>``.
        config: a densediff config for checkpoints of your own (trained with the official
            code on another dataset or size); None: recognise a released model.

    Returns:
        ``(model on CPU in eval mode, resolved config, the released entry or None)``.
    """
    # a bad --config is refused before the (large) file is read
    given = load_config(config) if config is not None else None
    path = resolve_source(source)
    state, meta = read_official(path)
    src = str(source)
    if config is None:
        arch = describe(state, src)
        entry = released_for(arch, meta, src)
        backbone = arch.backbone
    else:
        arch, entry = None, None
        backbone = None
    cfg = _official_config(entry, given, arch, meta, src)
    bev = is_bev_state(state)
    if bev and (cfg.task != "bev" or cfg.model.bev.arch != "bevfusion"
                or cfg.model.encoder.name != "swin" or cfg.model.type != "ddp"):
        raise UserError("--config: an official BEV checkpoint needs a BEV DDP config with "
                        "model.bev.arch: bevfusion on swin (e.g. nuscenes/ddp_c_swin_t_bevfusion.yaml)")
    lidar = bev and any(k.startswith("encoders.lidar.") for k in state)
    if bev and lidar != cfg.data.bev.lidar:
        raise UserError(f"--config: this official BEV checkpoint is "
                        f"{'camera + LiDAR' if lidar else 'camera-only'}: set data.bev.lidar: "
                        f"{str(lidar).lower()} (e.g. nuscenes/"
                        f"{'ddp_cl_swin_t_bevfusion' if lidar else 'ddp_c_swin_t_bevfusion'}.yaml)")
    if backbone is None:
        backbone = cfg.model.encoder.name
        if backbone not in ("swin", "convnext") or cfg.model.type != "ddp":
            raise UserError(f"--config: official checkpoints are DDP models on swin or "
                            f"convnext; the config has a {cfg.model.type} on {backbone}")
    model = build_model(cfg, len(cfg.data.class_names))
    converted = convert_state(state, backbone, model.state_dict(), src)
    load_into(model, converted, source=src)
    return model.eval(), cfg, entry


def convert(source: str | os.PathLike, out: str | os.PathLike,
            config: str | os.PathLike | None = None) -> Path:
    """``densediff convert``: write an official checkpoint as a densediff run folder.

    ``out`` gets ``config.yaml`` and ``checkpoints/best.safetensors`` (config in its metadata),
    which ``eval``, ``predict``, ``diagnose``, ``export``, ``bench`` and a DDPS ``base:``
    accept. ``out`` must not exist or be empty: nothing is ever overwritten.

    Returns:
        The weights file written.
    """
    from densediff.utils.fs import atomic_write, check_writable_dir

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"OUT: {out} exists{' and is not empty' if out.is_dir() else ''}; "
                        "choose a new folder (nothing is overwritten)")
    model, cfg, entry = load_official(source, config)
    check_writable_dir(out, "OUT")
    cfg.work_dir = str(out)
    weights = out / "checkpoints" / "best.safetensors"
    meta = {"kind": "model", "num_classes": len(cfg.data.class_names),
            "source": str(source), "official": entry.name if entry else "custom"}
    save_checkpoint(weights, model.state_dict(), cfg, meta)
    text = cfg.to_yaml()
    atomic_write(out / "config.yaml", lambda tmp: tmp.write_text(text))
    return weights
