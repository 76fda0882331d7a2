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


def test_preloaded_allocator_is_left_alone(monkeypatch):
    monkeypatch.setattr(alloc, "_state", "system")
    assert alloc.configure_allocator({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) == "preloaded"
    monkeypatch.setattr(alloc, "_state", "system")
    assert alloc.configure_allocator({"DENSEDIFF_MALLOC": "system"}) == "system"
