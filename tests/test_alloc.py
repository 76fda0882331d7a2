"""The fast glibc malloc settings of the CLI (``densediff.utils.alloc``): in effect, and off
with ``DENSEDIFF_MALLOC=system``."""

import os
import subprocess
import sys
import textwrap

import pytest

from densediff.errors import UserError
from densediff.utils import alloc

GLIBC = alloc._glibc() is not None

# Allocates and frees ~40 MiB tensors (above glibc's 32 MiB mmap ceiling) in a loop and
# prints the minor page faults of the last iterations, after the heap has settled.
_PROBE = textwrap.dedent("""
    import resource, torch
    from densediff.cli.main import main
    from densediff.utils.alloc import allocator_state
    main(["data", "check", "/nonexistent-densediff", "--format", "folder"])  # any command
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.randn(10 * 2**20)
    def work():
        y = x * 2
        return float((torch.tanh(y) + x)[0])
    for _ in range(12):
        work()
    f0 = faults()
    for _ in range(5):
        work()
    print(allocator_state(), (faults() - f0) // 5)
""")


def _probe(**env) -> tuple[str, int]:
    full = {**os.environ, **env}
    full.pop("LD_PRELOAD", None)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=full, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    state, faults = out.stdout.split()[-2:]
    return state, int(faults)


@pytest.mark.skipif(not GLIBC, reason="glibc malloc only")
def test_cli_process_reuses_large_blocks_instead_of_faulting_them_in():
    fast_state, fast = _probe(DENSEDIFF_MALLOC="fast")
    sys_state, system = _probe(DENSEDIFF_MALLOC="system")
    assert fast_state == "glibc-no-mmap" and sys_state == "system"
    # system malloc maps every ~40 MiB block afresh: ~10k faults per block and iteration
    assert system > 10_000
    assert fast < system / 100


def test_bad_setting_is_a_one_line_error():
    with pytest.raises(UserError, match="DENSEDIFF_MALLOC='jemalloc': expected fast or system"):
        alloc.configure_allocator({"DENSEDIFF_MALLOC": "jemalloc"})


def test_preloaded_allocator_and_system_setting_are_left_alone(monkeypatch):
    """jemalloc/tcmalloc preloaded, or DENSEDIFF_MALLOC=system: glibc's settings are never
    touched (the spy on ``set_glibc_fast``, the one place that calls ``mallopt``, stays
    empty); the default and ``fast`` apply them."""
    calls = []
    monkeypatch.setattr(alloc, "set_glibc_fast", lambda fast: calls.append(fast) or True)
    monkeypatch.setattr(alloc, "_state", "system")
    assert alloc.configure_allocator({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) == "preloaded"
    assert alloc.configure_allocator({"LD_PRELOAD": "libtcmalloc_minimal.so.4"}) == "preloaded"
    assert alloc.allocator_state() == "preloaded" and calls == []
    monkeypatch.setattr(alloc, "_state", "system")
    for value in ("system", " System "):
        assert alloc.configure_allocator({ENV: value}) == "system"
    assert calls == []
    alloc.configure_allocator({})
    alloc.configure_allocator({ENV: "FAST", "LD_PRELOAD": "/opt/libasan.so"})
    assert calls == [True, True]


@pytest.mark.skipif(not GLIBC, reason="glibc malloc only")
def test_set_glibc_fast_reports_the_state_it_set(monkeypatch):
    """On glibc both switches succeed (``mallopt`` returns 1) and name their state (this
    process's malloc is left fast afterwards, as ``densediff.cli.main.main`` leaves it)."""
    monkeypatch.setattr(alloc, "_state", "unset")  # neither value: each must be set here
    try:
        assert alloc.set_glibc_fast(False) is True and alloc.allocator_state() == "system"
        assert alloc.set_glibc_fast(True) is True and alloc.allocator_state() == "glibc-no-mmap"
    finally:
        alloc.set_glibc_fast(True)


ENV = alloc.ENV_VAR
