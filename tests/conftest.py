"""Shared fixtures. The tiny trained runs are trained once per test session (session scope)
and are read-only for the tests: a test that needs to write into a run copies it first
(:func:`copy_run`)."""

import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _camvid_root() -> Path | None:
    env = os.environ.get("DENSEDIFF_CAMVID_ROOT")
    if env:
        return Path(env) if Path(env).is_dir() else None
    default = REPO.parent / "shared" / "datasets" / "camvid_segnet" / "CamVid"
    return default if default.is_dir() else None


@pytest.fixture
def camvid_root() -> Path:
    root = _camvid_root()
    if root is None:
        pytest.skip("CamVid not found (set DENSEDIFF_CAMVID_ROOT)")
    return root


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield


def copy_run(run: Path, dest: Path) -> Path:
    """A writable copy of a shared run folder (the shared one must stay as trained)."""
    shutil.copytree(run, dest)
    return dest


def _train_cli(work: Path, config: str, *overrides: str) -> Path:
    from densediff.cli.main import main

    torch.manual_seed(0)
    torch.set_num_threads(1)
    assert main(["train", config, *overrides, f"work_dir={work}"]) == 0
    return work


@pytest.fixture(scope="session")
def tiny_baseline_run(tmp_path_factory) -> Path:
    """The tiny conv-head run on generated scenes (``test_cli.TINY``, 4 iterations), trained
    through the CLI once per session."""
    from test_cli import TINY

    return _train_cli(tmp_path_factory.mktemp("baseline") / "gen",
                      "configs/generated/baseline.yaml", *TINY)


@pytest.fixture(scope="session")
def tiny_ddp_run(tmp_path_factory) -> Path:
    """The tiny DDP run (``TINY`` + ``test_cli_ddp.DDP_TINY``, 4 iterations), trained through
    the CLI once per session. Untrained in effect: for wiring, files and bad input."""
    from test_cli import TINY
    from test_cli_ddp import DDP_TINY

    return _train_cli(tmp_path_factory.mktemp("ddp") / "run", "configs/generated/ddp.yaml",
                      *TINY, *DDP_TINY)


@pytest.fixture(scope="session")
def toy_ddp(tmp_path_factory):
    """A DDP that has learned the generated-scene task (``test_ddp.TOY``: 150 iterations,
    mIoU well above chance): ``(cfg, returned metrics)``. For claims that need a trained model
    (uncertainty on wrong pixels, the bf16 tolerance)."""
    from densediff.engine import trainer as T
    from densediff.tasks import load_config
    from test_ddp import TOY

    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = load_config("generated/baseline.yaml",
                      [f"work_dir={tmp_path_factory.mktemp('toy') / 'w'}", *TOY])
    return cfg, T.train(cfg)
