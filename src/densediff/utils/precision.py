"""Numerical precision of a forward pass: ``fp32``, or ``bf16`` autocast (CPU and CUDA alike).

Under ``bf16`` the convolutions and matrix products of the networks run in bfloat16
(``torch.autocast``); what must stay float32 does: the deformable-attention sampling
locations and attention softmax (:mod:`densediff.decoders.msda`), the diffusion arithmetic
(noise, DDIM/DDPM updates: :func:`densediff.diffusion.samplers.sample_map`) and everything
scored (probabilities are cast to float32 before the softmax that is averaged or scored).
``auto`` is ``bf16`` where the hardware computes it natively (a CUDA device with bf16, or a
CPU with AVX512-BF16 or AMX), else ``fp32``.
"""

from __future__ import annotations

import contextlib
import functools

import torch

__all__ = ["PRECISIONS", "autocast", "cpu_has_native_bf16", "cpu_model", "resolve_precision"]

PRECISIONS = ("fp32", "bf16")


def _cpuinfo(key: str) -> str | None:
    """The first ``key`` line's value in Linux ``/proc/cpuinfo`` (None elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (for the record of a measurement)."""
    import platform

    return _cpuinfo("model name") or platform.processor() or "unknown"


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 in hardware (Linux ``/proc/cpuinfo`` flags
    ``avx512_bf16`` or ``amx_bf16``); elsewhere bf16 on the CPU is emulated and slower."""
    flags = set((_cpuinfo("flags") or "").split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str, device: torch.device | str,
                      key: str = "--precision") -> str:
    """``fp32`` / ``bf16`` for ``precision`` in ``fp32 | bf16 | auto`` on ``device``
    (``auto``: bf16 where native, see the module doc); ValueError naming ``key`` otherwise."""
    if precision in PRECISIONS:
        return precision
    if precision != "auto":
        raise ValueError(f"{key}: expected fp32, bf16 or auto, got {precision!r}")
    dev = torch.device(device)
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if dev.type == "cpu" and cpu_has_native_bf16() else "fp32"


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The context a forward pass runs in: nothing for ``fp32``, ``torch.autocast`` to
    bfloat16 on ``device``'s type for ``bf16``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise ValueError(f"precision: expected fp32 or bf16, got {precision!r}")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
