"""Memory allocator settings for densediff's command-line processes (Linux, glibc).

glibc's ``malloc`` serves every block of 32 MiB or more (the ceiling of its dynamic mmap
threshold) with a fresh ``mmap`` and returns it to the kernel on ``free``. A map decoder
step at 512 x 512 allocates and frees dozens of such tensors, so every step touches fresh
pages: ~0.5 M minor page faults and ~1 s of kernel time per step on a 2-core machine (issue
#16; ``benchmarks/RESULTS.md`` has the measurement). PyTorch's CPU performance guide
recommends jemalloc or tcmalloc for this; glibc can be told the same with two settings,
applied here at run time with ``mallopt`` (the ``GLIBC_TUNABLES`` environment variable would
need a restart of the process):

- ``M_MMAP_MAX = 0``: never ``mmap`` a block, serve large blocks from the heap (glibc still
  falls back to ``mmap`` when the heap cannot grow);
- ``M_TRIM_THRESHOLD`` = its maximum: never give the top of the heap back.

Freed memory is then reused instead of faulted in again; the price is that the process keeps
its peak heap until it exits (the peak itself does not grow). :func:`configure_allocator`
is called by ``densediff.cli.main.main``, so every ``densediff`` command (and every torchrun
worker) gets it. ``DENSEDIFF_MALLOC=system`` turns it off. A process that already runs under
jemalloc or tcmalloc (``LD_PRELOAD``) is left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Mapping

__all__ = ["ENV_VAR", "allocator_state", "configure_allocator", "set_glibc_fast"]

ENV_VAR = "DENSEDIFF_MALLOC"
"""``fast`` (the default) or ``system`` (leave malloc as it is)."""

_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1

_state = "system"


def allocator_state() -> str:
    """What :func:`configure_allocator` did in this process: ``glibc-no-mmap`` (the settings
    are in effect), ``preloaded`` (jemalloc/tcmalloc via ``LD_PRELOAD``, left alone) or
    ``system`` (nothing changed: turned off, not glibc, or not called)."""
    return _state


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (absent on musl: not glibc)
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def configure_allocator(env: Mapping[str, str] | None = None) -> str:
    """Apply the fast glibc malloc settings (see the module doc) unless ``DENSEDIFF_MALLOC``
    is ``system``; returns :func:`allocator_state`. Idempotent; a no-op off Linux/glibc.
    An unknown ``DENSEDIFF_MALLOC`` value is a one-line ``UserError``."""
    from densediff.errors import UserError

    global _state
    env = os.environ if env is None else env
    choice = env.get(ENV_VAR, "fast").strip().lower() or "fast"
    if choice not in ("fast", "system"):
        raise UserError(f"{ENV_VAR}={env.get(ENV_VAR)!r}: expected fast or system")
    if choice == "system":
        return _state
    preload = env.get("LD_PRELOAD", "")
    if "jemalloc" in preload or "tcmalloc" in preload:
        _state = "preloaded"
        return _state
    set_glibc_fast(True)
    return _state


def set_glibc_fast(fast: bool) -> bool:
    """Switch the settings at run time (``densediff bench`` compares both in one process):
    ``fast`` as :func:`configure_allocator`; else glibc's behaviour once its dynamic
    thresholds have settled (blocks of 32 MiB or more mapped afresh and returned on free,
    heap top trimmed beyond 64 MiB). False when this is not glibc."""
    global _state
    libc = _glibc()
    if libc is None:
        return False
    if fast:
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
        _state = "glibc-no-mmap" if ok else _state
        return ok
    ok = (libc.mallopt(_M_MMAP_MAX, 65536) == 1
          and libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20) == 1
          and libc.mallopt(_M_TRIM_THRESHOLD, 64 * 2**20) == 1)
    _state = "system" if ok else _state
    return ok
