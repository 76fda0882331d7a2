"""What defines a task: :class:`TaskSpec`, one per entry of :data:`densediff.tasks.TASKS`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from densediff.config import Config
from densediff.errors import ConfigError
from densediff.pipelines.base import Pipeline

__all__ = ["TaskSpec"]


@dataclass(frozen=True)
class TaskSpec:
    """Everything the library knows about one task; nothing outside the task table branches
    on a task's name.

    Attributes:
        name: the ``task`` value of a config.
        datasets: the ``data.dataset`` values it accepts.
        metrics: its validation metric keys, in reporting order.
        headline: the metric that picks ``best.safetensors`` unless ``train.best_metric`` is
            set (and that ``diagnose`` compares).
        lower_is_better: the keys of ``metrics`` where lower is better.
        model_types: the ``model.type`` values it accepts.
        output_kind: what its models' maps hold (:data:`~densediff.models.interface.
            OUTPUT_KINDS`: classes, multilabel or depth).
        build_model: ``(cfg, num_classes) -> model`` (the :class:`~densediff.models.interface.
            DenseModel` of ``cfg.model``).
        build_dataset: ``(cfg, split, train) -> dataset``.
        class_info: ``cfg -> (class names, (K, 3) uint8 palette)``, without scanning data.
        pipeline: its outputs, scoring, result type and pictures.
        export_refusal: why ``densediff export`` does not take its models; "" when it does
            (encoder + step / head graphs on onnxruntime).
        check: its own config rules (raise ``ValueError`` with the key in the message).
    """

    name: str
    datasets: tuple[str, ...]
    metrics: tuple[str, ...]
    headline: str
    lower_is_better: frozenset[str]
    model_types: tuple[str, ...]
    output_kind: str
    build_model: Callable[[Config, int], nn.Module]
    build_dataset: Callable[[Config, str, bool], Any]
    class_info: Callable[[Config], tuple[list[str], np.ndarray]]
    pipeline: Pipeline
    export_refusal: str = ""
    check: Callable[[Config], None] = field(default=lambda cfg: None)

    def __post_init__(self):
        if self.headline not in self.metrics or not self.lower_is_better <= set(self.metrics):
            raise ValueError(f"task {self.name}: headline and lower_is_better must be metrics")

    def best_metric(self, cfg: Config) -> str:
        """``train.best_metric``, or the task's :attr:`headline`."""
        return cfg.train.best_metric or self.headline

    def validate(self, cfg: Config) -> None:
        """ConfigError (one line, naming the key) unless ``cfg`` fits this task."""
        try:
            if cfg.data.dataset not in self.datasets:
                raise ValueError(f"data.dataset {cfg.data.dataset!r} is not a {self.name} "
                                 f"dataset ({', '.join(self.datasets)})")
            metric = cfg.train.best_metric
            if metric is not None and metric not in self.metrics:
                raise ValueError(f"train.best_metric {metric!r} is not a {self.name} metric "
                                 f"({', '.join(self.metrics)})")
            if cfg.model.type not in self.model_types:
                raise ValueError(f"model.type {cfg.model.type} is not a {self.name} model "
                                 f"({', '.join(self.model_types)})")
            self.check(cfg)
        except ValueError as e:
            raise ConfigError(str(e)) from None
