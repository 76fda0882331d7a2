"""densediff.data.transforms: alignment of image and label, mmseg semantics, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from densediff.config import AugmentConfig, Config, DataConfig
from densediff.data import collate, preprocess_image
from densediff.data.transforms import (
    pad,
    photometric_distortion,
    random_crop,
    random_resize,
    rescale_size,
    resize_label,
    resize_to_scale,
    train_transform,
)

IGN = 255


def _coord_pair(h=40, w=60):
    """An image whose pixels encode their own (row, col) and a label encoding the same."""
    rr, cc = np.mgrid[0:h, 0:w]
    img = np.stack([rr, cc, np.zeros_like(rr)], axis=2).astype(np.uint8)
    label = (rr * 1000 + cc).astype(np.int64)
    return img, label


def _data(**pipe) -> DataConfig:
    return DataConfig(mean=(0, 0, 0), std=(1, 1, 1), size_divisor=32,
                      train_pipeline=AugmentConfig(photometric=False, **pipe))


def test_rescale_size_follows_mmcv():
    assert rescale_size((360, 480), (512, 2048)) == (512, 683)
    assert rescale_size((480, 360), (512, 2048)) == (683, 512)  # orientation-free box
    assert rescale_size((360, 480), (2048, 512)) == (512, 683)
    assert rescale_size((1024, 2048), (512, 1024)) == (512, 1024)
    assert resize_to_scale(np.zeros((360, 480, 3), np.uint8), (180, 240)).shape == (180, 240, 3)
    assert resize_to_scale(np.zeros((5, 7, 3), np.uint8), None).shape == (5, 7, 3)


@pytest.mark.parametrize("seed", range(8))
def test_crop_flip_pad_keep_image_and_label_aligned(seed):
    img, label = _coord_pair()
    data = _data(scale=None, crop_size=(24, 36), flip_prob=0.5)
    out, lab = train_transform(img, label, data, np.random.default_rng(seed))
    assert out.shape == (32, 64, 3) and lab.shape == (32, 64)  # crop, then pad to /32
    valid = lab != IGN
    assert valid.sum() == 24 * 36
    np.testing.assert_array_equal(out[..., 0][valid], lab[valid] // 1000)
    np.testing.assert_array_equal(out[..., 1][valid], lab[valid] % 1000)
    assert (out[~valid] == 0).all()  # padding: image 0, label ignore


def test_flip_happens_for_some_seeds():
    img, label = _coord_pair()
    data = _data(scale=None, crop_size=None, flip_prob=0.5)
    firsts = {int(train_transform(img, label, data, np.random.default_rng(s))[1][0, 0])
              for s in range(10)}
    assert firsts == {0, 59}  # column 0 or, flipped, column 59


@pytest.mark.parametrize("seed", range(6))
def test_random_resize_keeps_alignment(seed):
    img, label = _coord_pair()
    data = _data(scale=(40, 60), ratio_range=(0.5, 2.0), crop_size=(30, 30), flip_prob=0.5)
    out, lab = train_transform(img, label, data, np.random.default_rng(seed))
    valid = lab != IGN
    # bilinear (image) vs nearest (label) sampling differ by less than ~1 source pixel
    dr = np.abs(out[..., 0][valid] - lab[valid] // 1000)
    dc = np.abs(out[..., 1][valid] - lab[valid] % 1000)
    assert dr.max() <= 2 and dc.max() <= 2
    assert dr.mean() < 1 and dc.mean() < 1


def test_random_resize_scale_range():
    img, label = _coord_pair(36, 48)
    sizes = {random_resize(img, label, (36, 48), (0.5, 2.0), np.random.default_rng(s))[0].shape[:2]
             for s in range(30)}
    hs = [h for h, _ in sizes]
    assert min(hs) >= 18 and max(hs) <= 72 and len(sizes) > 5
    for h, w in sizes:  # aspect ratio kept
        assert abs(w / h - 48 / 36) < 0.1


def test_cat_max_ratio_honoured():
    label = np.zeros((100, 100), np.int64)
    label[:, 50:] = 1
    img = np.zeros((100, 100, 3), np.uint8)

    def share_ok(ratio):
        ok = 0
        for s in range(60):
            _, lab = random_crop(img, label, (20, 20), ratio, IGN, np.random.default_rng(s))
            counts = np.bincount(lab.ravel(), minlength=2)
            ok += counts.max() / counts.sum() < 0.75
        return ok / 60

    assert share_ok(0.75) > 0.5  # re-drawn up to 10 times: most crops straddle the border
    assert share_ok(1.0) < 0.3  # no re-draw: ~11% of windows straddle it


class _CountingRng:
    """A numpy Generator that counts its ``integers`` calls (two per crop window drawn)."""

    def __init__(self, seed: int):
        self.rng, self.calls = np.random.default_rng(seed), 0

    def integers(self, *args, **kwargs):
        self.calls += 1
        return self.rng.integers(*args, **kwargs)


def test_cat_max_ratio_ignores_ignore_pixels():
    img = np.zeros((40, 40, 3), np.uint8)
    # 80 % ignore in every window, classes 0 and 1 at 10 % each: 50 / 50 among the counted
    # pixels, so the first window is accepted (one draw); were ignore counted as a class it
    # would cover 80 % >= 0.75 and all 11 windows would be drawn
    label = np.full((40, 40), IGN, np.int64)
    label[::5, 0::2], label[::5, 1::2] = 0, 1
    rng = _CountingRng(0)
    out, lab = random_crop(img, label, (10, 10), 0.75, IGN, rng)
    assert out.shape[:2] == lab.shape == (10, 10) and rng.calls == 2
    assert (lab == IGN).mean() == pytest.approx(0.8)
    # only class 0 besides ignore: never acceptable (one counted class), so 1 + 10 windows are
    # drawn and the last one is returned, although half of the windows hold two values (0 and
    # ignore) that would pass were ignore a class
    label = np.full((40, 40), IGN, np.int64)
    label[:, :20] = 0
    rng = _CountingRng(0)
    out, lab = random_crop(img, label, (10, 10), 0.75, IGN, rng)
    assert out.shape[:2] == lab.shape == (10, 10) and rng.calls == 22
    replay = np.random.default_rng(0)
    windows = [(int(replay.integers(0, 31)), int(replay.integers(0, 31))) for _ in range(11)]
    top, left = windows[-1]
    np.testing.assert_array_equal(lab, label[top:top + 10, left:left + 10])
    assert any(left < 20 < left + 10 for _, left in windows[:10])  # mixed windows were drawn


def test_ignore_kept_through_resize_and_pad():
    label = np.zeros((30, 40), np.int64)
    label[::3, ::2] = IGN
    label[10:20, 10:20] = 4
    small = resize_label(label, (17, 23))
    big = resize_label(label, (61, 83))
    assert set(np.unique(small)) <= {0, 4, IGN} and set(np.unique(big)) == {0, 4, IGN}
    img = np.ones((17, 23, 3), np.float32)
    pimg, plab = pad(img, small, (32, 32), 32, IGN)
    assert plab.shape == (32, 32) and (plab[17:] == IGN).all() and (plab[:, 23:] == IGN).all()
    assert (pimg[17:] == 0).all() and (pimg[:17, :23] == 1).all()
    np.testing.assert_array_equal(plab[:17, :23], small)


def test_same_seed_same_sample_other_seed_differs():
    img = np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8)
    label = np.random.default_rng(1).integers(0, 5, (48, 64))
    data = DataConfig(train_pipeline=AugmentConfig(scale=(48, 64), crop_size=(32, 32)))
    a = train_transform(img, label, data, np.random.default_rng(7))
    b = train_transform(img, label, data, np.random.default_rng(7))
    c = train_transform(img, label, data, np.random.default_rng(8))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_photometric_distortion():
    grey = np.full((8, 8, 3), 120, np.uint8)
    colour = np.random.default_rng(0).integers(0, 255, (8, 8, 3), np.uint8)
    changed = 0
    for s in range(20):
        g = photometric_distortion(grey, np.random.default_rng(s))
        assert g.dtype == np.uint8 and g.shape == grey.shape
        assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()  # no tint
        c = photometric_distortion(colour, np.random.default_rng(s))
        np.testing.assert_array_equal(c, photometric_distortion(colour, np.random.default_rng(s)))
        changed += not np.array_equal(c, colour)
    assert changed >= 15  # each of 4 steps fires with p=0.5: ~94% of images change


def test_preprocess_image():
    cfg = Config()
    cfg.data.test_scale = (32, 48)
    img = np.empty((60, 90, 3), np.uint8)
    img[:] = np.round(cfg.data.mean).astype(np.uint8)
    x = preprocess_image(img, cfg)
    assert x.shape == (1, 3, 32, 48) and x.dtype == torch.float32
    assert x.abs().max() < 0.01  # the mean colour normalises to ~0
    with pytest.raises(ValueError):
        preprocess_image(img[..., 0], cfg)


def test_collate_pads_with_zero_and_ignore():
    a = {"image": torch.ones(3, 4, 5), "label": torch.zeros(4, 5, dtype=torch.long),
         "meta": {"path": "a", "ignore_index": 7}}
    b = {"image": torch.ones(3, 6, 3), "label": torch.ones(6, 3, dtype=torch.long),
         "meta": {"path": "b", "ignore_index": 7}}
    out = collate([a, b])
    assert out["image"].shape == (2, 3, 6, 5) and out["label"].shape == (2, 6, 5)
    assert (out["image"][0, :, 4:] == 0).all() and (out["label"][0, 4:] == 7).all()
    assert (out["label"][1, :, 3:] == 7).all() and (out["label"][1, :, :3] == 1).all()
    assert [m["path"] for m in out["meta"]] == ["a", "b"]
    assert (collate([a, b], ignore_index=255)["label"][0, 4:] == 255).all()
