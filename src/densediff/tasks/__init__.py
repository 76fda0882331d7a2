"""The task table: one :class:`TaskSpec` per task (segmentation, depth, BEV), and the three
calls that go through it (:func:`build_model`, :func:`build_dataset`, :func:`class_info`).

Config validation, the trainer, evaluation, ``diagnose``, ``export``, ``bench``, ``info``, the
demo and the CLI read a task's facts here (:func:`spec_for`); nothing else branches on a task's
name. Adding a task = one entry in :data:`TASKS` and its own modules
(``docs/architecture.md``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from densediff import config as _config
from densediff.config import MIN_TRAIN_SIDE, Config
from densediff.criteria.depth import METRIC_KEYS as DEPTH_METRIC_KEYS
from densediff.data import (
    bev_class_info,
    build_bev_dataset,
    build_depth_dataset,
    build_seg_dataset,
    depth_class_info,
    seg_class_info,
)
from densediff.errors import ConfigError
from densediff.models import build_bev_model, build_depth_model, build_segmentation_model
from densediff.pipelines.bev import BEVPipeline
from densediff.pipelines.depth import DepthPipeline
from densediff.pipelines.segmentation import SegmentationPipeline
from densediff.tasks.spec import TaskSpec

__all__ = ["TASKS", "TaskSpec", "build_dataset", "build_model", "class_info", "config_from_dict",
           "load_config", "spec_for"]


def check_train_crop(cfg: Config) -> None:
    """The training crop must leave the encoder's deepest (stride-32) map more than one value
    per channel in a batch, or BatchNorm fails at the first iteration."""
    crop = cfg.data.train_pipeline.crop_size
    if crop is None or cfg.model.type == "ddps":
        return
    h, w = crop
    cells = -(-h // MIN_TRAIN_SIDE) * -(-w // MIN_TRAIN_SIDE)
    if cells * cfg.data.batch_size < 2:
        raise ValueError(f"data.train_pipeline.crop_size {list(crop)} with data.batch_size "
                         f"{cfg.data.batch_size} leaves BatchNorm one value per channel at "
                         f"stride {MIN_TRAIN_SIDE}: use a crop side >= {2 * MIN_TRAIN_SIDE} "
                         "or a batch of 2 or more")


def _check_depth(cfg: Config) -> None:
    if cfg.data.train_pipeline.scale is not None:
        raise ValueError("data.train_pipeline.scale must be unset for depth: resizing "
                         "changes the apparent focal length, not metric depth")
    check_train_crop(cfg)


def _check_bev(cfg: Config) -> None:
    if cfg.model.aux_head.enabled:
        raise ValueError("model.aux_head.enabled must be false for bev (the BEV models "
                         "have no aux head)")


DEPTH_ERRORS = frozenset({"abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog"})

TASKS: dict[str, TaskSpec] = {
    "segmentation": TaskSpec(
        name="segmentation",
        datasets=("camvid", "ade20k", "cityscapes", "folder", "generated"),
        metrics=("mIoU", "mAcc", "aAcc", "mBIoU"), headline="mIoU",
        lower_is_better=frozenset(), model_types=("segmentor", "ddp", "ddps"),
        output_kind="classes",
        build_model=build_segmentation_model, build_dataset=build_seg_dataset,
        class_info=seg_class_info, pipeline=SegmentationPipeline(), check=check_train_crop),
    "depth": TaskSpec(
        name="depth",
        datasets=("kitti", "nyu", "sunrgbd", "folder", "generated"),
        metrics=DEPTH_METRIC_KEYS, headline="abs_rel", lower_is_better=DEPTH_ERRORS,
        model_types=("segmentor", "ddp"), output_kind="depth",
        build_model=build_depth_model, build_dataset=build_depth_dataset,
        class_info=depth_class_info, pipeline=DepthPipeline(), check=_check_depth),
    "bev": TaskSpec(
        name="bev",
        datasets=("nuscenes", "generated"),
        # mIoU: the mean over classes of each class's best IoU over the thresholds 0.35..0.65
        # (BEVFusion protocol); mIoU@0.50: the mean IoU at threshold 0.5
        metrics=("mIoU", "mIoU@0.50"), headline="mIoU", lower_is_better=frozenset(),
        model_types=("segmentor", "ddp"), output_kind="multilabel",
        build_model=build_bev_model, build_dataset=build_bev_dataset,
        class_info=bev_class_info, pipeline=BEVPipeline(), check=_check_bev,
        export_refusal="a BEV model cannot be exported (multi-camera input with calibration)"),
}
"""Task name -> its spec (a fixed table, not a registry)."""


def spec_for(cfg_or_task: Config | str) -> TaskSpec:
    """The spec of a config's task (the config is validated against it: ConfigError naming
    the key) or of a task name (ConfigError when there is no such task)."""
    task = cfg_or_task if isinstance(cfg_or_task, str) else cfg_or_task.task
    spec = TASKS.get(task)
    if spec is None:
        raise ConfigError(f"task {task!r}: not a task ({', '.join(TASKS)})")
    if not isinstance(cfg_or_task, str):
        spec.validate(cfg_or_task)
    return spec


def build_model(cfg: Config, num_classes: int) -> nn.Module:
    """The model of ``cfg`` (its task's :attr:`TaskSpec.build_model`)."""
    return spec_for(cfg).build_model(cfg, num_classes)


def build_dataset(cfg: Config, split: str, train: bool) -> Any:
    """The dataset of ``cfg`` for ``split`` with the train or test pipeline (its task's
    :attr:`TaskSpec.build_dataset`)."""
    return spec_for(cfg).build_dataset(cfg, split, train)


def class_info(cfg: Config) -> tuple[list[str], np.ndarray]:
    """Class names and ``(K, 3)`` uint8 palette of ``cfg`` without scanning its data."""
    return spec_for(cfg).class_info(cfg)


def load_config(path: str | None, overrides: list[str] | None = None) -> Config:
    """:func:`densediff.config.load_config` (the schema: every key, type and bound) and the
    checks of the config's task (:meth:`TaskSpec.validate`): the config the library runs."""
    cfg = _config.load_config(path, overrides)
    _validated(cfg, str(_config.resolve_config_path(path)) if path is not None else "config")
    return cfg


def config_from_dict(data: dict, source: str = "config") -> Config:
    """:func:`densediff.config.config_from_dict` and the checks of the config's task."""
    return _validated(_config.config_from_dict(data, source=source), source)


def _validated(cfg: Config, source: str) -> Config:
    try:
        spec_for(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg
