import os
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
