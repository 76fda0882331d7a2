"""densediff: dense visual prediction as conditional denoising diffusion (DDP, DDPS).

Quick use::

    import densediff
    model = densediff.load("runs/x/checkpoints/best.safetensors")
    out = model.predict("street.png")   # out.mask, out.probs, out.color, out.overlay
    model = densediff.load_onnx("export/")  # `densediff export`: the same, on onnxruntime
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["format_diagnosis", "load", "load_onnx", "__version__"]


def load(checkpoint, device="cpu", overrides=None, precision="fp32"):
    """Load a checkpoint written by ``densediff train``; see :func:`densediff.api.load`."""
    from densediff.api import load as _load

    return _load(checkpoint, device=device, overrides=overrides, precision=precision)


def load_onnx(folder, threads=None, providers=None):
    """Load a folder written by ``densediff export`` as a Predictor whose network runs in
    onnxruntime; see :func:`densediff.deploy.load_onnx`."""
    from densediff.deploy import load_onnx as _load_onnx

    return _load_onnx(folder, threads=threads, providers=providers)


def format_diagnosis(report: dict) -> str:
    """The tables of a ``Predictor.diagnose`` report; see
    :func:`densediff.engine.diagnose.format_diagnosis`."""
    from densediff.engine.diagnose import format_diagnosis as _format

    return _format(report)
