"""Shared fixtures. The tiny trained runs are trained once per test session (session scope)
and are read-only for the tests: a test that needs to write into a run copies it first
(:func:`densediff.testing.runs.copy_run`). Plain helpers and override lists shared by the test
modules live in :mod:`densediff.testing` (no test module imports another)."""

import os
from pathlib import Path

import pytest
import torch

from densediff.tasks import load_config
from densediff.testing.tiny import DDP_HEAD, TINY, TOY_DDP

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


def _train_cli(work: Path, config: str, *overrides: str) -> Path:
    from densediff.cli.main import main

    torch.manual_seed(0)
    torch.set_num_threads(1)
    assert main(["train", config, *overrides, f"work_dir={work}"]) == 0
    return work


@pytest.fixture(scope="session")
def tiny_baseline_run(tmp_path_factory) -> Path:
    """The tiny conv-head run on generated scenes (``TINY["generated/baseline.yaml"]`` of
    :mod:`densediff.testing.tiny`, 4 iterations), trained through the CLI once per session."""
    return _train_cli(tmp_path_factory.mktemp("baseline") / "gen",
                      "configs/generated/baseline.yaml", *TINY["generated/baseline.yaml"])


@pytest.fixture(scope="session")
def tiny_ddp_run(tmp_path_factory) -> Path:
    """The tiny DDP run (the baseline's tiny overrides + ``DDP_HEAD``, 4 iterations), trained
    through the CLI once per session. Untrained in effect: for wiring, files and bad input."""
    return _train_cli(tmp_path_factory.mktemp("ddp") / "run", "configs/generated/ddp.yaml",
                      *TINY["generated/baseline.yaml"], *DDP_HEAD)


@pytest.fixture(scope="session")
def toy_ddp(tmp_path_factory):
    """A DDP that has learned the generated-scene task (``TOY_DDP``: 150 iterations,
    mIoU well above chance): ``(cfg, returned metrics)``. For claims that need a trained model
    (uncertainty on wrong pixels, the bf16 tolerance)."""
    from densediff.engine import trainer as T

    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = load_config("generated/baseline.yaml",
                      [f"work_dir={tmp_path_factory.mktemp('toy') / 'w'}", *TOY_DDP])
    return cfg, T.train(cfg)
