"""``densediff.utils.memstat``: the page-fault and peak-memory counters of ``bench`` see a
phase known to fault, and read (near) 0 for one that maps nothing."""

from __future__ import annotations

import mmap
import sys

import pytest

from densediff.utils import memstat

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux counters")

MIB = 2**20


def _fault(nbytes: int) -> None:
    m = mmap.mmap(-1, nbytes)
    for i in range(0, nbytes, mmap.PAGESIZE):
        m[i] = 1
    m.close()


def test_probe_reports_which_counters_work_here():
    ok = memstat.probe()
    assert set(ok) == {"faults", "hwm", "sampled"}
    assert ok["sampled"]  # /proc/self/statm is all it needs


def test_a_phase_that_maps_memory_reads_its_faults_and_its_peak():
    ok = memstat.probe()
    with memstat.Phase() as ph:
        _fault(64 * MIB)
    pages = 64 * MIB // mmap.PAGESIZE
    if ok["faults"]:
        assert ph.faults >= pages // 2
    else:
        assert ph.faults is None  # blind counter: None, never 0
    assert ph.peak_rise is not None and ph.peak_rise >= 48 * MIB
    if ok["hwm"]:
        assert ph.hwm_rise >= 48 * MIB


def test_a_phase_that_maps_nothing_reads_little():
    buf = bytearray(8 * MIB)  # resident before the phase
    with memstat.Phase() as ph:
        for i in range(0, len(buf), mmap.PAGESIZE):
            buf[i] = 2
    if ph.faults is not None:
        assert ph.faults < 1000
    assert ph.peak_rise < 8 * MIB


def test_a_blind_counter_reads_none(monkeypatch):
    monkeypatch.setattr(memstat, "probe", lambda: {"faults": False, "hwm": False,
                                                   "sampled": False})
    with memstat.Phase() as ph:
        _fault(4 * MIB)
    assert ph.faults is None and ph.peak_rise is None


def test_cpu_flags_are_a_subset_of_those_asked():
    assert set(memstat.cpu_flags(("avx2", "no_such_flag"))) <= {"avx2"}
