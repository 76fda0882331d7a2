"""The built wheel ships every config, and a wheel installed into a fresh venv (torch pinned
first, as the Makefile does) runs ``densediff info`` on a shipped ablation config from a folder
outside the repository.

The wheel is built from a copy of ``pyproject.toml``, ``README.md`` and ``src/densediff`` in a
temporary folder, so the shared working tree gets no ``build/`` or ``*.egg-info``. The venv test
needs pip to reach its index (PyPI) for the dependencies; it skips, with pip's own message, only
when the index cannot be reached, and fails on any other install error.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "src" / "densediff" / "configs"
TORCH_PIN = "torch==2.13.0"  # the Makefile's pin (constraints.txt)
ABLATION = "ade20k/ablations/depth_1.yaml"  # one of the configs the old globs missed
PIP_QUIET = ["--quiet", "--no-input", "--disable-pip-version-check"]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, **kw)


def _tail(proc: subprocess.CompletedProcess, lines: int = 15) -> str:
    text = proc.stdout + proc.stderr
    keep = [ln for ln in text.splitlines() if not ln.startswith("WARNING: Location")]
    return "\n".join(keep[-lines:])


def _index_reachable() -> tuple[bool, str]:
    """Does pip's index (PIP_INDEX_URL, else PyPI) answer? An HTTP request, not a bare TCP
    connect: a sandbox's proxy may accept connections to any address."""
    url = (os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple").rstrip("/")
    if urlparse(url).scheme not in ("http", "https"):  # a local (file:) index needs no network
        return True, url
    ctx = ssl.create_default_context(cafile=os.environ.get("PIP_CERT") or None)
    try:
        with urllib.request.urlopen(f"{url}/pip/", timeout=15, context=ctx) as r:
            return r.status == 200, f"{url}: HTTP {r.status}"
    except (OSError, ValueError) as e:
        return False, f"{url}: {e}"


def _pip_or_skip(cmd: list[str], what: str, **kw) -> None:
    proc = _run(cmd, **kw)
    if proc.returncode == 0:
        return
    ok, where = _index_reachable()
    if not ok:
        pytest.skip(f"{what}: pip's index cannot be reached ({where}); pip said:\n{_tail(proc, 5)}")
    pytest.fail(f"{what} failed (exit {proc.returncode}):\n{_tail(proc)}")


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """A wheel of the working tree, built in a temporary copy of it."""
    src = tmp_path_factory.mktemp("wheel_src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "src" / "densediff", src / "src" / "densediff",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    out = tmp_path_factory.mktemp("wheel")
    # the installed setuptools builds it offline; without it, pip fetches one (build isolation)
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    _pip_or_skip([sys.executable, "-m", "pip", "wheel", *PIP_QUIET, "--no-deps", *isolation,
                  "-w", str(out), str(src)], "building the wheel", cwd=src)
    (whl,) = out.glob("densediff-*.whl")
    return whl


@pytest.mark.slow  # builds a wheel of the tree
def test_wheel_ships_every_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = sorted(p.relative_to(CONFIGS.parent.parent).as_posix() for p in CONFIGS.rglob("*")
                     if p.suffix in (".yaml", ".yml"))
    ablations = [c for c in configs if c.startswith("densediff/configs/ade20k/ablations/")]
    assert len(ablations) >= 20, ablations  # the folder the old package-data globs missed
    missing = [c for c in configs if c not in names]
    assert not missing, f"{len(missing)} of {len(configs)} configs not in {wheel.name}: {missing}"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "densediff = densediff.cli.main:main" in zipfile.ZipFile(wheel).read(
        entry_points).decode()


@pytest.fixture(scope="session")
def fresh_venv(wheel, tmp_path_factory) -> Path:
    """A new venv with the pinned torch installed on its own first, then the wheel (with the
    ``hf`` extra: the ADE20K configs use a transformers backbone) under constraints.txt."""
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    proc = _run([sys.executable, "-m", "venv", str(venv)])
    assert proc.returncode == 0, f"python -m venv failed:\n{_tail(proc)}"
    py = venv / "bin" / "python"
    # --no-compile: no .pyc for torch's thousands of files (halves the install time here)
    pip = [str(py), "-m", "pip", "install", *PIP_QUIET, "--no-compile"]
    _pip_or_skip([*pip, TORCH_PIN], f"pip install {TORCH_PIN} into a fresh venv")
    _pip_or_skip([*pip, "-c", str(REPO / "constraints.txt"),
                  f"densediff[hf] @ {wheel.as_uri()}"], f"pip install {wheel.name}[hf]")
    return venv


@pytest.mark.slow  # a fresh venv with torch from PyPI (~1.5 min)
def test_wheel_in_fresh_venv_runs_info_on_a_shipped_ablation(fresh_venv, tmp_path):
    t0 = time.time()
    bindir = fresh_venv / "bin"
    where = _run([str(bindir / "python"), "-c", "import densediff, torch; "
                  "print(densediff.__file__); print(torch.__version__)"], cwd=tmp_path)
    assert where.returncode == 0, _tail(where)
    module, torch_version = where.stdout.split()
    assert Path(module).is_relative_to(fresh_venv), module  # not the repo's source tree
    assert torch_version.startswith(TORCH_PIN.split("==")[1]), torch_version

    proc = _run([str(bindir / "densediff"), "info", ABLATION, "--size", "64", "64"],
                cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, _tail(proc)
    out = proc.stdout
    assert "task: segmentation   dataset: ade20k   classes: 150" in out, out
    assert "decoder" in out and "total" in out, out  # the parameter table
    assert "FLOPs per image at 64x64" in out, out
    assert time.time() - t0 < 300


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_ci_runs_the_default_suite_the_slow_tests_and_the_devkit_check():
    """``make test`` deselects ``slow``, ``make test-slow`` runs exactly those, the devkit
    check runs in its own venv and may not skip, and CI (``.ci/run``) runs all three."""
    proc = subprocess.run(["make", "-n", "-W", "pyproject.toml", "test", "test-slow",
                           "test-devkit"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    runs = [ln for ln in proc.stdout.splitlines() if "-m pytest" in ln]
    assert len(runs) == 3, runs
    assert runs[0].endswith('-m pytest tests -m "not slow"')
    assert runs[1].endswith("-m pytest tests -m slow")
    assert "DENSEDIFF_REQUIRE_DEVKIT=1" in runs[2] and runs[2].endswith("tests/test_nuscenes_devkit.py")
    assert '"numpy<2" "nuscenes-devkit' in proc.stdout
    ci = [ln.split("#")[0].strip() for ln in (REPO / ".ci" / "run").read_text().splitlines()]
    assert "make test" in ci  # the README's command, as it is
    assert "make test-slow test-devkit" in ci
    make = subprocess.run(["make", "-n", "-p", "test-all"], cwd=REPO, capture_output=True, text=True)
    assert "test-all: test test-slow test-devkit" in make.stdout
