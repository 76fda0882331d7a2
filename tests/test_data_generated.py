"""The built-in procedural dataset: determinism, sizes, classes, colour carries no class."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from densediff.config import DataConfig
from densediff.data.worlds.shapes import GENERATED_CLASSES, GeneratedDataset, render_scene
from densediff.errors import DataError


def test_deterministic_by_seed_and_split():
    data = DataConfig(gen_num_train=4, gen_num_val=3, gen_num_test=2, gen_size=(48, 80))
    a, b = GeneratedDataset(data, "train", False), GeneratedDataset(data, "train", False)
    assert (len(a), len(GeneratedDataset(data, "val", False)),
            len(GeneratedDataset(data, "test", False))) == (4, 3, 2)
    for i in range(len(a)):
        assert torch.equal(a[i]["image"], b[i]["image"]) and torch.equal(a[i]["label"], b[i]["label"])
    assert a[0]["image"].shape == (3, 48, 80) and a[0]["meta"]["ori_size"] == (48, 80)
    assert not torch.equal(a[0]["image"], a[1]["image"])
    val = GeneratedDataset(data, "val", False)
    assert not torch.equal(a[0]["label"], val[0]["label"])  # splits are different streams
    other = GeneratedDataset(data.model_copy(update={"gen_seed": 1}), "train", False)
    assert not torch.equal(a[0]["label"], other[0]["label"])


def test_labels_cover_all_classes():
    labels = [render_scene(np.random.default_rng([0, 0, i]), (64, 64))[1] for i in range(10)]
    counts = np.bincount(np.concatenate([lab.ravel() for lab in labels]), minlength=6)
    assert len(counts) == len(GENERATED_CLASSES) and (counts > 0).all()
    assert counts[2:].sum() / counts.sum() > 0.15  # shapes are not a negligible share


def test_colour_does_not_identify_class():
    scenes = [render_scene(np.random.default_rng([3, 0, i]), (48, 48)) for i in range(40)]
    img = np.concatenate([s[0].reshape(-1, 3) for s in scenes]).astype(np.float64)
    lab = np.concatenate([s[1].ravel() for s in scenes])
    means = np.stack([img[lab == k].mean(0) for k in range(6)])
    spread = np.mean([np.linalg.norm(img[lab == k].std(0)) for k in range(6)])
    gaps = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert gaps.max() < 0.6 * spread  # class means are close compared with within-class spread


def test_train_pipeline_and_bad_split():
    data = DataConfig(gen_num_train=2, gen_size=(40, 40))
    ds = GeneratedDataset(data, "train", True)
    s1, s2 = ds[(0, 1)], ds[(0, 1)]
    assert torch.equal(s1["image"], s2["image"]) and s1["image"].shape == (3, 64, 64)  # pad /32
    assert (s1["label"][40:] == 255).all()
    with pytest.raises(DataError, match="generated dataset: split must be"):
        GeneratedDataset(data, "holdout", False)
