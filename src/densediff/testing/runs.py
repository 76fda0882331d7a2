"""Configs, checkpoints and run folders of the tiny runs (:mod:`densediff.testing.tiny`)."""

from __future__ import annotations

import shutil
from pathlib import Path

from densediff.cli.main import main
from densediff.config import Config
from densediff.tasks import build_model, class_info, load_config
from densediff.testing.tiny import QUICK_BASELINE, TINY
from densediff.utils.checkpoint import save_checkpoint

__all__ = ["copy_run", "tiny_config", "train_generated", "untrained_checkpoint"]


def copy_run(run: Path, dest: Path) -> Path:
    """A writable copy of a shared run folder (the shared one must stay as trained)."""
    shutil.copytree(run, dest)
    return dest


def tiny_config(work_dir: Path, *overrides: str) -> Config:
    """``generated/baseline.yaml`` with :data:`~densediff.testing.tiny.QUICK_BASELINE`, writing
    into ``work_dir``, then ``overrides``."""
    return load_config("generated/baseline.yaml",
                       [f"work_dir={work_dir}", *QUICK_BASELINE, *overrides])


def untrained_checkpoint(path, *overrides):
    """A valid (untrained) checkpoint of the tiny generated-data model, written at ``path``."""
    cfg = load_config("generated/baseline.yaml", [*TINY["generated/baseline.yaml"], *overrides,
                                                  f"work_dir={path.parent}"])
    names, palette = class_info(cfg)
    cfg.data.class_names = list(names)
    cfg.data.palette = [tuple(int(c) for c in rgb) for rgb in palette]
    save_checkpoint(path, build_model(cfg, len(names)).state_dict(), cfg, {"iteration": 0})
    return path


def train_generated(root: Path, task: str, names, overrides) -> Path:
    """Train ``configs/generated/{task}_{name}.yaml`` through the CLI into ``root / name`` for
    each name, with ``overrides``; the ``ddp`` run evaluates twice (iterations 2 and 4 of a
    4-iteration run), so that its best checkpoint is a real choice. Returns ``root``."""
    for name in names:
        extra = ["train.eval_interval=2"] if name == "ddp" else []
        assert main(["train", f"configs/generated/{task}_{name}.yaml", *overrides, *extra,
                     f"work_dir={root / name}"]) == 0
    return root
