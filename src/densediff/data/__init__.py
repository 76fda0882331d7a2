"""Datasets, transforms and batching for dense prediction.

Entry points: :func:`build_dataset` (from the run config), :func:`collate` (DataLoader
``collate_fn``), :func:`preprocess_image` (a new image -> model input),
:func:`densediff.data.check.check_dataset` (validate a dataset folder) and the layouts
documented in :mod:`densediff.data.layouts` (segmentation) and :mod:`densediff.data.depth`
(depth). The procedural ``generated`` datasets live in :mod:`densediff.data.worlds`; writers
of tiny on-disk datasets for tests are :mod:`densediff.testing.fixtures`.
"""

from densediff.data.build import (
    build_dataset,
    build_depth_dataset,
    class_info,
    resolve_root,
    root_env_var,
)
from densediff.data.datasets import SegDataset, collate
from densediff.data.depth import DepthDataset, read_depth
from densediff.data.transforms import preprocess_image
from densediff.data.worlds.rooms import GeneratedDepthDataset, render_depth_scene
from densediff.data.worlds.shapes import GeneratedDataset

__all__ = ["SegDataset", "GeneratedDataset", "DepthDataset", "GeneratedDepthDataset",
           "build_dataset", "build_depth_dataset", "class_info", "collate", "preprocess_image",
           "read_depth", "render_depth_scene", "resolve_root", "root_env_var"]
