"""Deployment: ONNX export of a checkpoint (:mod:`~densediff.deploy.export`, ``densediff
export``) and an onnxruntime model behind the usual :class:`~densediff.api.Predictor`
(:mod:`~densediff.deploy.runtime`, :func:`load_onnx`, ``densediff predict --runtime onnx``).

Supported: segmentation and depth DDP models and the discriminative twins / baselines; BEV and
DDPS models are refused at export. Needs the ``onnx`` extra (``pip install "densediff[onnx]"``).
"""

from __future__ import annotations

import os

from densediff.deploy.export import SUPPORTED, default_input_size, export, export_model
from densediff.deploy.runtime import (
    OnnxDDP,
    OnnxSegmentor,
    load_onnx_model,
    load_runtime,
    read_deploy,
)

__all__ = ["SUPPORTED", "OnnxDDP", "OnnxSegmentor", "default_input_size", "export",
           "export_model", "load_onnx", "load_onnx_model", "load_runtime", "read_deploy"]


def load_onnx(folder: str | os.PathLike, threads: int | None = None,
              providers: list[str] | None = None):
    """A folder written by ``densediff export`` as a :class:`~densediff.api.Predictor` whose
    network work runs in onnxruntime (``predict`` and the result's ``.save`` as with
    :func:`densediff.load`; the same seed gives the same noise as the PyTorch model).

    ``threads``: onnxruntime's intra-op threads (None: ``torch.get_num_threads()``);
    ``providers``: its execution providers (None: CPU)."""
    from densediff.api import Predictor

    model, cfg, names, palette = load_runtime(folder, threads, providers)
    return Predictor(model, cfg, names, palette, "cpu")
