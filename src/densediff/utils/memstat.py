"""Page faults and peak resident memory of a phase of this process, measured so that they
cannot read 0 while memory is being mapped (what ``densediff bench`` reports per variant).

Two counters can silently read 0 on some kernels and sandboxes: ``getrusage``'s minor page
faults (kept at 0 by some sandboxed kernels) and ``VmHWM``, the peak resident set (reset
through ``/proc/self/clear_refs``, which not every kernel allows). Each is therefore checked
once per process against a phase that is known to fault (:func:`probe`: an anonymous 16 MiB
mapping, every page touched); one that does not see it is reported as unavailable (None),
never as 0. Peak memory has a second source that needs no kernel support beyond
``/proc/self/statm``: a thread that samples the resident set every millisecond during the
phase (:class:`Phase`); the peak is the larger of the two.

Linux only; elsewhere everything reads None.
"""

from __future__ import annotations

import functools
import mmap
import threading
import time

__all__ = ["PROBE_BYTES", "Phase", "cpu_flags", "minor_faults", "probe", "rss_bytes", "trim_heap"]

PROBE_BYTES = 16 * 2**20
"""Size of the known-faulting probe mapping."""
_PAGE = mmap.PAGESIZE
_SAMPLE_S = 0.001


def minor_faults() -> int | None:
    """Minor page faults of this process so far (all threads), or None where ``resource``
    is missing."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def rss_bytes() -> int | None:
    """The resident set of this process now (``/proc/self/statm``), or None."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _touch_fresh_mapping(nbytes: int = PROBE_BYTES) -> None:
    """Map ``nbytes`` of fresh anonymous memory, write one byte per page, unmap it: one minor
    fault per page and a resident-set rise of ``nbytes``."""
    m = mmap.mmap(-1, nbytes)
    try:
        for i in range(0, nbytes, _PAGE):
            m[i] = 1
        time.sleep(3 * _SAMPLE_S)  # let a sampler see it resident
    finally:
        m.close()


@functools.lru_cache(maxsize=1)
def probe() -> dict[str, bool]:
    """Which counters see a phase known to fault (:func:`_touch_fresh_mapping`): ``faults``
    (``getrusage`` minor faults), ``hwm`` (``VmHWM`` after a reset) and ``sampled`` (the
    sampling thread of :class:`Phase`). Each True when it saw at least half of the probe."""
    pages = PROBE_BYTES // _PAGE
    f0 = minor_faults()
    _touch_fresh_mapping()
    f1 = minor_faults()
    faults = f0 is not None and f1 is not None and f1 - f0 >= pages // 2
    ph = Phase(checked=False)
    with ph:
        _touch_fresh_mapping()
    return {"faults": faults,
            "hwm": ph.hwm_rise is not None and ph.hwm_rise >= PROBE_BYTES // 2,
            "sampled": ph.sampled_rise is not None and ph.sampled_rise >= PROBE_BYTES // 2}


def trim_heap() -> bool:
    """Give glibc's free heap memory back to the kernel (``malloc_trim(0)``), so that what a
    phase maps is not served from memory an earlier phase left resident. False where this is
    not glibc."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


class Phase:
    """Context manager measuring one phase: ``faults`` (minor page faults, all threads),
    ``peak_rise`` (bytes: the peak resident set during the phase minus the resident set at
    its start; the larger of ``VmHWM`` and a 1 ms sampler). With ``checked`` (the default)
    a counter that :func:`probe` found blind reads None, not 0."""

    def __init__(self, checked: bool = True):
        self.checked = checked
        self.faults: int | None = None
        self.hwm_rise: int | None = None
        self.sampled_rise: int | None = None
        self._stop = threading.Event()
        self._peak = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            r = rss_bytes()
            if r is not None and r > self._peak:
                self._peak = r
            self._stop.wait(_SAMPLE_S)

    def __enter__(self) -> Phase:
        self._ok = probe() if self.checked else {"faults": True, "hwm": True, "sampled": True}
        self._reset = _reset_hwm()
        self._rss0 = rss_bytes()
        self._peak = self._rss0 or 0
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._f0 = minor_faults()
        return self

    def __exit__(self, *exc) -> None:
        f1 = minor_faults()
        self._stop.set()
        self._thread.join()
        if self._ok["faults"] and self._f0 is not None and f1 is not None:
            self.faults = f1 - self._f0
        if self._rss0 is not None:
            hwm = _hwm_bytes()
            if self._reset and hwm is not None and self._ok["hwm"]:
                self.hwm_rise = max(0, hwm - self._rss0)
            if self._ok["sampled"]:
                self.sampled_rise = max(0, self._peak - self._rss0)

    @property
    def peak_rise(self) -> int | None:
        """The larger of the two peak measurements (None when neither works here)."""
        got = [v for v in (self.hwm_rise, self.sampled_rise) if v is not None]
        return max(got) if got else None


def cpu_flags(wanted: tuple[str, ...] = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16",
                                        "amx_bf16", "amx_int8", "avx_vnni")) -> list[str]:
    """Those of ``wanted`` this CPU has (Linux ``/proc/cpuinfo`` flags; [] elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []

