"""Datasets, transforms and batching for dense prediction.

Entry points: the dataset builders of each task (:func:`build_seg_dataset`,
:func:`build_depth_dataset`, :func:`build_bev_dataset`; :func:`densediff.tasks.build_dataset`
picks one by ``cfg.task``), :func:`collate` (DataLoader
``collate_fn``), :func:`preprocess_image` (a new image -> model input),
:func:`densediff.data.check.check_dataset` (validate a dataset folder) and the layouts
documented in :mod:`densediff.data.layouts` (segmentation) and :mod:`densediff.data.depth`
(depth). The procedural ``generated`` datasets live in :mod:`densediff.data.worlds`; writers
of tiny on-disk datasets for tests are :mod:`densediff.testing.fixtures`.
"""

from densediff.data.build import (
    bev_class_info,
    build_bev_dataset,
    build_depth_dataset,
    build_seg_dataset,
    depth_class_info,
    resolve_root,
    root_env_var,
    seg_class_info,
)
from densediff.data.datasets import SegDataset, collate
from densediff.data.depth import DepthDataset, read_depth
from densediff.data.transforms import preprocess_image
from densediff.data.worlds.rooms import GeneratedDepthDataset, render_depth_scene
from densediff.data.worlds.shapes import GeneratedDataset

__all__ = ["SegDataset", "GeneratedDataset", "DepthDataset", "GeneratedDepthDataset",
           "bev_class_info", "build_bev_dataset", "build_depth_dataset", "build_seg_dataset",
           "collate", "depth_class_info", "preprocess_image", "seg_class_info",
           "read_depth", "render_depth_scene", "resolve_root", "root_env_var"]
