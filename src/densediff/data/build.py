"""Build a dataset from the run config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from densediff.config import BEV_MAP_CLASSES
from densediff.data.bev import BEVDataset
from densediff.data.classes import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    BEV_MAP_PALETTE,
    CAMVID_CLASSES,
    CAMVID_PALETTE,
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    default_palette,
    read_classes_file,
)
from densediff.data.datasets import SegDataset
from densediff.data.depth import (
    DEPTH_FORMATS,
    DepthDataset,
    depth_scale_for,
    scan_depth,
)
from densediff.data.layouts import scan
from densediff.data.nuscenes import NuScenesDataset
from densediff.data.worlds.bev_dataset import GeneratedBEVDataset
from densediff.data.worlds.rooms import GeneratedDepthDataset
from densediff.data.worlds.shapes import GENERATED_CLASSES, GENERATED_PALETTE, GeneratedDataset
from densediff.errors import ConfigError, DataError

if TYPE_CHECKING:
    from densediff.config import Config


def root_env_var(dataset: str) -> str:
    """The environment variable naming a dataset's folder, e.g. ``DENSEDIFF_CAMVID_ROOT``."""
    return f"DENSEDIFF_{dataset.upper()}_ROOT"


def resolve_root(cfg: Config) -> Path:
    """The dataset folder: ``data.root``, else ``$DENSEDIFF_<DATASET>_ROOT``.

    Raises:
        DataError: neither is set, or the folder does not exist.
    """
    var = root_env_var(cfg.data.dataset)
    if cfg.data.root is not None:
        root, source = cfg.data.root, "data.root"
    elif os.environ.get(var):
        root, source = os.environ[var], f"${var}"
    else:
        raise DataError(f"no folder for dataset {cfg.data.dataset!r}: set data.root or ${var}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"{path}: dataset folder not found (from {source})")
    return path


def _check_classes(cfg: Config, num_classes: int) -> None:
    d = cfg.data
    if d.num_classes is not None and d.num_classes != num_classes:
        raise ConfigError(f"data.num_classes={d.num_classes} but dataset {d.dataset!r} has "
                          f"{num_classes} classes")
    if 0 <= d.ignore_index < num_classes:
        raise ConfigError(f"data.ignore_index={d.ignore_index} collides with class ids "
                          f"0..{num_classes - 1}")


def build_seg_dataset(cfg: Config, split: str, train: bool) -> SegDataset:
    """The segmentation dataset ``cfg.data.dataset`` for ``split`` with the train or test
    pipeline.

    Args:
        cfg: the run config (``cfg.data`` and ``cfg.seed`` are read).
        split: split name, usually ``cfg.data.train_split``/``val_split``/``test_split``.
        train: use the training pipeline (augmentation, crop, pad) instead of the test one.

    Raises:
        DataError: the folder is missing or its layout is broken (the message names the first
            problem; ``densediff.data.check.check_dataset`` lists them all).
        ConfigError: ``data.num_classes`` or ``data.ignore_index`` does not fit the dataset.
    """
    d = cfg.data
    if d.dataset == "generated":
        ds: SegDataset = GeneratedDataset(d, split, train, seed=cfg.seed)
    elif d.dataset in ("camvid", "ade20k", "cityscapes", "folder"):
        root = resolve_root(cfg)
        layout = scan(d.dataset, root, split, d.ignore_index, d.num_classes)
        if layout.problems:
            more = len(layout.problems) - 1
            extra = f" (+{more} more problems; run `densediff data check`)" if more else ""
            raise DataError(layout.problems[0] + extra)
        ds = SegDataset(layout.files, layout.class_names, layout.palette, layout.lut, d, train,
                        seed=cfg.seed, name=f"{d.dataset}/{split}", colours=layout.colours)
    else:
        raise ConfigError(f"data.dataset: unknown dataset {d.dataset!r}")
    _check_classes(cfg, ds.num_classes)
    return ds


def build_bev_dataset(cfg: Config, split: str, train: bool) -> BEVDataset:
    """The BEV dataset of ``cfg.data.dataset``: nuScenes (``data.root`` /
    ``$DENSEDIFF_NUSCENES_ROOT``) or the generated world."""
    if cfg.data.dataset == "nuscenes":
        return NuScenesDataset(cfg.data, resolve_root(cfg), split, train, seed=cfg.seed)
    return GeneratedBEVDataset(cfg.data, split, train, seed=cfg.seed)


def build_depth_dataset(cfg: Config, split: str, train: bool) -> DepthDataset:
    """The depth dataset ``cfg.data.dataset`` for ``split`` with the train or test pipeline.

    Raises:
        DataError: missing folder or list file, broken layout (the first problem is named),
            sunrgbd ``train``.
        ConfigError: a folder dataset without ``data.depth.depth_scale``.
    """
    d = cfg.data
    if d.dataset == "generated":
        return GeneratedDepthDataset(d, split, train, seed=cfg.seed)
    if d.dataset not in DEPTH_FORMATS:
        raise ConfigError(f"data.dataset {d.dataset!r} is not a depth dataset "
                          f"({', '.join(DEPTH_FORMATS)}, generated)")
    scale = depth_scale_for(d.dataset, d.depth.depth_scale)
    root = resolve_root(cfg)
    layout = scan_depth(d.dataset, root, split)
    if layout.problems:
        more = len(layout.problems) - 1
        extra = f" (+{more} more problems; run `densediff data check`)" if more else ""
        raise DataError(layout.problems[0] + extra)
    return DepthDataset(layout.files, d, train, seed=cfg.seed, name=f"{d.dataset}/{split}",
                        depth_scale=scale, sunrgbd=d.dataset == "sunrgbd",
                        skipped=layout.skipped)


ClassInfo = tuple[list[str], np.ndarray]
"""Class names and their ``(K, 3)`` uint8 palette."""


def stored_class_info(cfg: Config) -> ClassInfo | None:
    """``data.class_names`` / ``data.palette`` when set (the trainer stores them in every
    resolved config, so a checkpoint is self-contained); None otherwise."""
    d = cfg.data
    if d.class_names is None:
        return None
    palette = (np.asarray(d.palette, np.uint8) if d.palette is not None
               else default_palette(len(d.class_names)))
    if len(palette) != len(d.class_names):
        raise ConfigError(f"data.palette has {len(palette)} colours for "
                          f"{len(d.class_names)} data.class_names")
    return list(d.class_names), palette


def seg_class_info(cfg: Config) -> ClassInfo:
    """Segmentation classes without scanning the dataset: the stored ones
    (:func:`stored_class_info`), the dataset's built-in classes, or the folder dataset's
    ``classes.txt`` (or ``data.num_classes`` generic names)."""
    stored = stored_class_info(cfg)
    if stored is not None:
        return stored
    d = cfg.data
    builtin = {"generated": (GENERATED_CLASSES, GENERATED_PALETTE),
               "camvid": (CAMVID_CLASSES, CAMVID_PALETTE),
               "ade20k": (ADE20K_CLASSES, ADE20K_PALETTE),
               "cityscapes": (CITYSCAPES_CLASSES, CITYSCAPES_PALETTE)}
    if d.dataset in builtin:
        names, palette = builtin[d.dataset]
        return list(names), np.asarray(palette, np.uint8)
    cls_file = resolve_root(cfg) / "classes.txt"
    if cls_file.is_file():
        return read_classes_file(cls_file)
    if d.num_classes is None:
        raise DataError(f"{cls_file}: not found (list the classes, or set data.num_classes)")
    return [f"class_{i}" for i in range(d.num_classes)], default_palette(d.num_classes)


def depth_class_info(cfg: Config) -> ClassInfo:
    """Depth: the one channel ``["depth"]`` with a white palette entry (or the stored ones)."""
    return stored_class_info(cfg) or (["depth"], np.array([[255, 255, 255]], np.uint8))


def bev_class_info(cfg: Config) -> ClassInfo:
    """BEV: ``data.bev.classes`` (the six map classes have fixed colours), or the stored ones."""
    stored = stored_class_info(cfg)
    if stored is not None:
        return stored
    names = list(cfg.data.bev.classes)
    known = dict(zip(BEV_MAP_CLASSES, BEV_MAP_PALETTE))
    palette = default_palette(len(names))
    return names, np.array([known.get(n, tuple(palette[i])) for i, n in enumerate(names)],
                           np.uint8)
