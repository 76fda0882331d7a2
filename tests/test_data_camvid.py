"""The real CamVid (SegNet) folder: split counts, sizes and label range (skips when absent)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from densediff.config import Config
from densediff.data.io import read_label
from densediff.tasks import build_dataset

pytestmark = pytest.mark.camvid


def test_camvid_counts_and_labels(camvid_root):
    cfg = Config()
    cfg.data.dataset = "camvid"
    cfg.data.root = str(camvid_root)
    for split, n in (("train", 367), ("val", 101), ("test", 233)):
        ds = build_dataset(cfg, split, train=False)
        assert len(ds) == n and ds.num_classes == 11
        for i in (0, n // 2, n - 1):
            s = ds[i]
            assert s["image"].shape == (3, 360, 480) and s["label"].shape == (360, 480)
            lab, raw = s["label"], torch.from_numpy(read_label(ds.files[i][1]))
            assert int(raw.max()) <= 11
            assert torch.equal(lab == 255, raw == 11)  # void -> ignore, nothing else
            assert set(lab.unique().tolist()) <= set(range(11)) | {255}
        values = set()
        for _, label_path in ds.files:  # every label map: raw values are 0..11 only
            values |= set(np.unique(read_label(label_path)).tolist())
        assert values == set(range(12)), (split, sorted(values))
