"""densediff: dense visual prediction as conditional denoising diffusion (DDP, DDPS).

Quick use::

    import densediff
    model = densediff.load("runs/x/checkpoints/best.safetensors")
    out = model.predict("street.png")   # out.mask, out.probs, out.color, out.overlay
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["format_diagnosis", "load", "__version__"]


def load(checkpoint, device="cpu"):
    """Load a checkpoint written by ``densediff train``; see :func:`densediff.api.load`."""
    from densediff.api import load as _load

    return _load(checkpoint, device=device)


def format_diagnosis(report: dict) -> str:
    """The tables of a ``Predictor.diagnose`` report; see
    :func:`densediff.engine.diagnose.format_diagnosis`."""
    from densediff.engine.diagnose import format_diagnosis as _format

    return _format(report)
