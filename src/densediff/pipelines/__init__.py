"""One module per task: :mod:`~densediff.pipelines.segmentation`,
:mod:`~densediff.pipelines.depth`, :mod:`~densediff.pipelines.bev`, each a
:class:`~densediff.pipelines.base.Pipeline` (outputs from a model's trajectory, one image's
metric update, the result type with ``.save``, the pictures), found through the task table
(``TaskSpec.pipeline`` in :data:`densediff.tasks.TASKS`).
:mod:`~densediff.pipelines.inference` holds the whole-image / sliding-window / multi-scale +
flip inference they share.
"""

from __future__ import annotations

from densediff.pipelines.base import (
    Pipeline,
    check_steps,
    is_diffusion,
    resolve_steps,
    sample_seed,
    takes_starts,
)
from densediff.pipelines.bev import BEVPipeline, BEVPrediction
from densediff.pipelines.depth import DepthPipeline, DepthPrediction
from densediff.pipelines.segmentation import Prediction, SegmentationPipeline

__all__ = ["BEVPipeline", "BEVPrediction", "DepthPipeline", "DepthPrediction", "Pipeline",
           "Prediction", "SegmentationPipeline", "check_steps", "is_diffusion", "resolve_steps",
           "sample_seed", "takes_starts"]
