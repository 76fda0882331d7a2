"""Numerical precision of a forward pass: ``fp32``, or ``bf16`` autocast (CPU and CUDA alike).

Under ``bf16`` the convolutions and matrix products of the networks run in bfloat16
(``torch.autocast``); what must stay float32 does: the deformable-attention sampling
locations and attention softmax (:mod:`densediff.decoders.msda`), the diffusion arithmetic
(noise, DDIM/DDPM updates: :func:`densediff.diffusion.samplers.sample_map`) and everything
scored (probabilities are cast to float32 before the softmax that is averaged or scored).
``auto`` is ``bf16`` where the hardware computes it natively (a CUDA device with bf16, or a
CPU with AVX512-BF16 or AMX), else ``fp32``.

Training also takes ``fp16`` (float16 autocast; the trainer scales the loss with
``torch.amp.GradScaler``), and its ``auto`` (:func:`resolve_train_precision`) picks fp16 on a
CUDA card without bf16, where float16 tensor cores are the fast path.
"""

from __future__ import annotations

import contextlib
import functools

import torch

__all__ = ["PRECISIONS", "TRAIN_PRECISIONS", "autocast", "cpu_has_native_bf16", "cpu_model",
           "cuda_has_bf16", "resolve_precision", "resolve_train_precision"]

PRECISIONS = ("fp32", "bf16")
"""Inference precisions (``--precision``; ``auto`` resolves to one of them)."""

TRAIN_PRECISIONS = ("fp32", "bf16", "fp16")
"""Training precisions (``train.precision``; ``auto`` resolves to one of them)."""


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


def cuda_has_bf16(device: torch.device | str) -> bool:
    """Whether the CUDA device computes bf16 (``torch.cuda.is_bf16_supported()`` on it:
    compute capability 8.0 and later, e.g. A100, RTX 30xx/40xx, H100)."""
    dev = torch.device(device)
    if dev.index is None:  # the current device
        return bool(torch.cuda.is_bf16_supported())
    with torch.cuda.device(dev.index):
        return bool(torch.cuda.is_bf16_supported())


def resolve_train_precision(precision: str, device: torch.device | str,
                            key: str = "train.precision") -> str:
    """``fp32`` / ``bf16`` / ``fp16`` for ``train.precision`` in ``fp32 | bf16 | fp16 | auto``
    on ``device``; ValueError naming ``key`` otherwise.

    ``auto``: on CUDA bf16 where the card has it (:func:`cuda_has_bf16`: Ampere and later),
    else fp16 with loss scaling (V100, T4, RTX 20xx); on the CPU the rule of
    :func:`resolve_precision` (bf16 where the CPU has native bf16, else fp32). An explicit
    ``bf16`` on a CUDA card without it is refused (it would run emulated, or fail).
    """
    dev = torch.device(device)
    if precision not in TRAIN_PRECISIONS + ("auto",):
        raise ValueError(f"{key}: expected fp32, bf16, fp16 or auto, got {precision!r}")
    if dev.type == "cuda":
        if precision == "auto":
            return "bf16" if cuda_has_bf16(dev) else "fp16"
        if precision == "bf16" and not cuda_has_bf16(dev):
            raise ValueError(f"{key}: bf16 needs a CUDA card of compute capability 8.0 or later "
                             f"({torch.cuda.get_device_name(dev)} has none); use fp16 or auto")
        return precision
    if precision == "auto":
        return resolve_precision("auto", dev, key)
    return precision


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The context a forward pass runs in: nothing for ``fp32``, ``torch.autocast`` to
    bfloat16 (``bf16``) or float16 (``fp16``) on ``device``'s type."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise ValueError(f"precision: expected fp32, bf16 or fp16, got {precision!r}")
    return torch.autocast(torch.device(device).type, dtype=dtypes[precision])
