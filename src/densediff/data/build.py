"""Build a dataset from the run config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from densediff.data.datasets import SegDataset
from densediff.data.generated import GeneratedDataset
from densediff.data.layouts import scan
from densediff.errors import ConfigError, DataError

if TYPE_CHECKING:
    from densediff.config import Config


def root_env_var(dataset: str) -> str:
    """The environment variable naming a dataset's folder, e.g. ``DENSEDIFF_CAMVID_ROOT``."""
    return f"DENSEDIFF_{dataset.upper()}_ROOT"


def resolve_root(cfg: "Config") -> Path:
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


def _check_classes(cfg: "Config", num_classes: int) -> None:
    d = cfg.data
    if d.num_classes is not None and d.num_classes != num_classes:
        raise ConfigError(f"data.num_classes={d.num_classes} but dataset {d.dataset!r} has "
                          f"{num_classes} classes")
    if 0 <= d.ignore_index < num_classes:
        raise ConfigError(f"data.ignore_index={d.ignore_index} collides with class ids "
                          f"0..{num_classes - 1}")


def build_dataset(cfg: "Config", split: str, train: bool) -> SegDataset:
    """The dataset ``cfg.data.dataset`` for ``split`` with the train or test pipeline.

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
                        seed=cfg.seed, name=f"{d.dataset}/{split}")
    else:
        raise ConfigError(f"data.dataset: unknown dataset {d.dataset!r}")
    _check_classes(cfg, ds.num_classes)
    return ds
