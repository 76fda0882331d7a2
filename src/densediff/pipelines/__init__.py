"""One module per task: :mod:`~densediff.pipelines.segmentation`,
:mod:`~densediff.pipelines.depth`, :mod:`~densediff.pipelines.bev`, each a
:class:`~densediff.pipelines.base.Pipeline` (outputs from a model's trajectory, one image's
metric update, the result type with ``.save``, the pictures), found through
:data:`PIPELINES` keyed by ``cfg.task``. :mod:`~densediff.pipelines.inference` holds the
whole-image / sliding-window / multi-scale + flip inference they share.

Adding a task: a module here with its ``Pipeline`` subclass and result type, one entry in
:data:`PIPELINES`, its ``task`` value in :mod:`densediff.config`, its dataset in
:func:`densediff.data.build_dataset` and its model in :func:`densediff.models.build_model`
(``docs/architecture.md``).
"""

from __future__ import annotations

from densediff.pipelines.base import (
    Pipeline,
    check_steps,
    is_diffusion,
    resolve_steps,
    sample_seed,
)
from densediff.pipelines.bev import BEVPipeline, BEVPrediction
from densediff.pipelines.depth import DepthPipeline, DepthPrediction
from densediff.pipelines.segmentation import Prediction, SegmentationPipeline

__all__ = ["BEVPrediction", "DepthPrediction", "PIPELINES", "Pipeline", "Prediction",
           "check_steps", "is_diffusion", "pipeline_for", "resolve_steps", "sample_seed"]

PIPELINES: dict[str, Pipeline] = {
    "segmentation": SegmentationPipeline(),
    "depth": DepthPipeline(),
    "bev": BEVPipeline(),
}
"""The task table: ``cfg.task`` -> its pipeline (a fixed table, not a registry)."""


def pipeline_for(cfg_or_task) -> Pipeline:
    """The pipeline of a config (its ``task``) or of a task name."""
    task = getattr(cfg_or_task, "task", cfg_or_task)
    return PIPELINES[task]
