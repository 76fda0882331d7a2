"""Checkpoint files: model weights in safetensors, training state in a ``weights_only`` torch file.

A weights file ``<name>.safetensors`` holds a model state dict and, in the safetensors metadata
(string -> string), the resolved run config as JSON plus a few descriptive entries
(``iteration``, ``kind`` = ``model`` or ``ema``, ``num_classes``, ...), so one file is enough
to rebuild and run the model. Loading it never executes pickled code.

The training state ``<name>.state.pt`` (optimizer, iteration, RNG states, ...) holds tensors,
numbers, strings and containers only and is read with ``torch.load(weights_only=True)``.

Every file is written atomically (temporary file in the same folder, fsync, ``os.replace``),
so a run killed mid-write leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from densediff.errors import CheckpointError, one_line, terminal_line
from densediff.utils.checks import MAX_NESTING, json_depth, require_file
from densediff.utils.fs import atomic_write

__all__ = ["FORMAT", "atomic_write", "first_nonfinite", "load_into", "load_metadata",
           "load_train_state", "load_weights", "resolve_weights", "save_checkpoint",
           "save_train_state"]

FORMAT = "densediff"
"""Value of the ``format`` metadata entry in every weights file written here."""


def _storage_safe(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that own their storage (safetensors rejects shared memory)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in state.items():
        t = v.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def first_nonfinite(state: Mapping[str, torch.Tensor]) -> str | None:
    """Name of the first floating-point tensor holding NaN or inf, or None."""
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return k
    return None


def save_checkpoint(path: str | os.PathLike, model_state: Mapping[str, torch.Tensor],
                    cfg: Any, extra_meta: Mapping[str, Any] | None = None) -> None:
    """Write ``model_state`` to a safetensors file, atomically, with the config in the metadata.

    Args:
        path: target file (conventionally ``.../<name>.safetensors``).
        model_state: a model ``state_dict()``.
        cfg: the resolved :class:`~densediff.config.Config` (or its dict form).
        extra_meta: more metadata (``iteration``, ``kind``, ``num_classes``...); non-string
            values are stored as JSON.

    Raises:
        CheckpointError: a tensor holds NaN/inf (training diverged); nothing is written, so
            an earlier good checkpoint at ``path`` survives.
    """
    from safetensors.torch import save_file

    bad = first_nonfinite(model_state)
    if bad is not None:
        raise CheckpointError(
            f"{path}: not written, weight {bad!r} holds NaN/inf (training diverged; "
            f"try a lower train.lr or set train.grad_clip)")
    cfg_dict = dict(cfg) if isinstance(cfg, Mapping) else cfg.to_dict()
    meta = {"format": FORMAT, "config": json.dumps(cfg_dict)}
    for k, v in (extra_meta or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    tensors = _storage_safe(model_state)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta),
                 error=CheckpointError)


def load_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """All metadata of a densediff weights file, JSON entries decoded (``config`` is a dict)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; give a .safetensors checkpoint file "
                              f"(e.g. <work_dir>/checkpoints/best.safetensors)")
    require_file(path, error=CheckpointError, hint="; give a .safetensors checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path}: corrupt, truncated or not a safetensors file "
                              f"({one_line(e)})") from None
    if raw.get("format") != FORMAT or "config" not in raw:
        raise CheckpointError(f"{path}: not a densediff checkpoint (no config in its metadata)")
    meta: dict[str, Any] = {}
    for k, v in raw.items():
        if json_depth(v) > MAX_NESTING:  # checked before parsing: no RecursionError
            raise CheckpointError(f"{path}: metadata entry {terminal_line(k)[:60]!r} is nested "
                                  f"more than {MAX_NESTING} levels deep")
        try:
            meta[k] = json.loads(v)
        except (ValueError, RecursionError):
            meta[k] = v
    if not isinstance(meta["config"], dict):
        raise CheckpointError(f"{path}: the config in its metadata is not a mapping")
    return meta


def load_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a weights file written by :func:`save_checkpoint`.

    Returns:
        ``(state_dict, config_dict)``, tensors on CPU. The other metadata entries are
        available from :func:`load_metadata`.

    Raises:
        CheckpointError: missing, truncated/corrupt, or not a densediff checkpoint.
    """
    from safetensors.torch import load_file

    meta = load_metadata(path)
    try:
        state = load_file(str(path), device="cpu")
    except Exception as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({one_line(e)})") from None
    return state, meta["config"]


def resolve_weights(path: str | os.PathLike, key: str) -> Path:
    """A weights file given as a file, or as a run folder (its ``checkpoints/best``, else
    ``last``). ``key`` names the setting in errors (e.g. ``train.load_from``)."""
    path = Path(path)
    if path.is_dir():
        found = [c for c in (path / "checkpoints" / n for n in ("best.safetensors",
                                                              "last.safetensors")) if c.is_file()]
        if not found:
            raise CheckpointError(f"{key}: {path} holds no checkpoints/best or last.safetensors")
        return found[0]
    if not path.is_file():
        raise CheckpointError(f"{key}: {path}: no such checkpoint file or run folder")
    return path


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor],
              source: str | os.PathLike = "checkpoint") -> None:
    """Load ``state`` into ``model`` strictly, with a one-line error on the first mismatch.

    Raises:
        CheckpointError: naming ``source`` and the first key that is missing, unexpected, or
            of the wrong shape.
    """
    _compare(model.state_dict(), state, source)
    model.load_state_dict(state, strict=True)


MAX_MODEL_BYTES = 16 * 2**30
"""Largest model (parameters + buffers) a checkpoint's config may ask for: 16 GiB."""


def check_fits(build: Callable[[], nn.Module], state: Mapping[str, torch.Tensor],
               source: str | os.PathLike = "checkpoint",
               max_bytes: int = MAX_MODEL_BYTES) -> None:
    """Build the model ``build()`` describes on the ``meta`` device (no memory) and compare it
    with ``state`` before the real build: a stored config that asks for other or enormous
    layers is refused in one line, before anything is allocated.

    Raises:
        CheckpointError: the model would exceed ``max_bytes``, or a key is missing,
            unexpected or of another shape than in ``state``.
    """
    try:
        with torch.device("meta"):
            model = build()
    except CheckpointError:
        raise
    except (MemoryError, OverflowError) as e:
        raise CheckpointError(f"{source}: its config asks for a model too large to build "
                              f"({type(e).__name__})") from None
    except Exception as e:  # a module that cannot be built on meta: the real build decides
        if "meta" not in str(e).lower() and isinstance(e, (ValueError, TypeError)):
            raise CheckpointError(f"{source}: its config does not give a model "
                                  f"({one_line(e, 120)})") from None
        return
    own = model.state_dict()
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    if total > max_bytes:
        raise CheckpointError(f"{source}: its config asks for a model of {total / 2**30:.1f} GiB,"
                              f" above the limit of {max_bytes / 2**30:.0f} GiB")
    _compare(own, state, source)


def _compare(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
             source: str | os.PathLike) -> None:
    for k, v in own.items():
        if k not in state:
            raise CheckpointError(f"{source}: does not fit the model: key {k!r} is missing")
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{source}: does not fit the model: {k!r} has shape {tuple(state[k].shape)} "
                f"in the checkpoint but {tuple(v.shape)} in the model")
    for k in state:
        if k not in own:
            raise CheckpointError(f"{source}: does not fit the model: unexpected key {k!r}")


def save_train_state(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """``torch.save`` the training state atomically (tensors, numbers, strings, containers)."""
    atomic_write(path, lambda tmp: torch.save(dict(state), tmp), error=CheckpointError)


def load_train_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training state with ``torch.load(weights_only=True)`` onto the CPU.

    Raises:
        CheckpointError: the file is missing, truncated or holds anything but plain data.
    """
    path = require_file(path, error=CheckpointError)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):  # torch's refusal: say it in our own words
            raise CheckpointError(
                f"{path}: refused: it holds pickled Python objects, not only tensors, numbers, "
                "strings and containers; such files can run code when loaded, so densediff "
                "never loads them") from None
        raise CheckpointError(f"{path}: corrupt or not a training state ({one_line(e)})") from None
    except Exception as e:
        raise CheckpointError(f"{path}: corrupt or not a training state ({one_line(e)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a training state (top level is not a dict)")
    return state
