"""Depth data: loaders on tiny fixtures in each real layout, depth reading, the train pipeline,
the procedural room renderer, and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from densediff.config import Config
from densediff.data import collate
from densediff.data import depth as depth_mod
from densediff.data.check import check_dataset
from densediff.data.depth import (
    color_augment,
    depth_train_transform,
    encode_depth,
    kb_crop,
    read_depth,
    rotate,
)
from densediff.data.worlds.rooms import (
    GeneratedDepthDataset,
    render_depth_scene,
    render_scene_arrays,
    sample_depth_scene,
)
from densediff.errors import ConfigError, DataError
from densediff.tasks import build_dataset, class_info
from densediff.testing import fixtures as fx


def _cfg(fmt, root=None, **depth) -> Config:
    cfg = Config(task="depth")
    cfg.data.dataset = fmt
    cfg.data.root = str(root) if root is not None else None
    for k, v in depth.items():
        setattr(cfg.data.depth, k, v)
    return cfg


def _plain_train(cfg: Config) -> Config:
    """A train pipeline that changes nothing but normalisation (no rotation/flip/crop/colour)."""
    cfg.data.depth.rotate = 0.0
    cfg.data.train_pipeline.flip_prob = 0.0
    cfg.data.train_pipeline.photometric = False
    cfg.data.train_pipeline.crop_size = None
    cfg.data.size_divisor = 1
    return cfg


def _raw_png(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int64)


def _assert_matches_scene(label: np.ndarray, scene: np.ndarray, step: float) -> None:
    """Read-back depth equals the written scene depth within half a quantisation step; no-GT
    pixels stay 0 and nothing else is 0."""
    valid = scene > 0
    assert valid.any()
    np.testing.assert_allclose(label[valid], scene[valid], atol=step / 2 + 1e-6)
    assert (label[~valid] == 0).all()
    assert (label[valid] > 0).all()


# --------------------------------------------------------------------------------------------
# reading depth PNGs


def test_read_depth_16bit_8bit_and_bad_modes(tmp_path):
    vals = np.array([[0, 1, 256], [1000, 20480, 65535]], np.uint16)
    Image.fromarray(vals).save(tmp_path / "d16.png")
    np.testing.assert_allclose(read_depth(tmp_path / "d16.png", 256.0), vals / 256.0, rtol=1e-6)
    Image.fromarray(np.array([[0, 7, 255]], np.uint8)).save(tmp_path / "d8.png")
    np.testing.assert_allclose(read_depth(tmp_path / "d8.png", 10.0), [[0, 0.7, 25.5]], rtol=1e-6)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match=r"rgb.png: depth map must be a single-channel 16-bit or "
                                        r"8-bit image, got mode RGB") as e:
        read_depth(tmp_path / "rgb.png", 1000.0)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="nothere.png: file not found"):
        read_depth(tmp_path / "nothere.png", 1000.0)


def test_sunrgbd_bit_rotation_round_trip(tmp_path):
    # one known value by hand: 1234 mm is stored rotated left by 3 bits
    assert encode_depth(np.array([1.234]), 1000.0, sunrgbd=True)[0] == 1234 << 3
    big = 0b1110_0000_0000_0001  # high bits wrap around to the bottom
    stored = ((big << 3) | (big >> 13)) & 0xFFFF
    assert encode_depth(np.array([big]), 1.0, sunrgbd=True)[0] == stored
    # every 16-bit value survives write -> read
    allv = np.arange(65536, dtype=np.int64).reshape(256, 256)
    Image.fromarray(encode_depth(allv, 1.0, sunrgbd=True)).save(tmp_path / "sun.png")
    raw = _raw_png(tmp_path / "sun.png")
    np.testing.assert_array_equal(((raw >> 3) | (raw << 13)) & 0xFFFF, allv)  # the toolbox's decode
    np.testing.assert_array_equal(read_depth(tmp_path / "sun.png", 1.0, sunrgbd=True), allv)
    assert not np.array_equal(read_depth(tmp_path / "sun.png", 1.0), allv)


# --------------------------------------------------------------------------------------------
# layouts


def test_kitti_eigen_layout_sparse_gt_and_none_entries(tmp_path):
    root = fx.write_kitti(tmp_path, n=3, size=(40, 72))
    ds = build_dataset(_cfg("kitti", root), "train", train=False)
    assert len(ds) == 3 and ds.skipped == 1 and "1 entries without depth skipped" in repr(ds)
    assert ds.depth_scale == 256.0 and ds.num_classes == 1 and ds.class_names == ["depth"]
    assert ds.ignore_index == 0 and ds.palette.shape == (1, 3)
    img_path, dep_path = ds.files[0]
    assert img_path.relative_to(root).as_posix() == \
        "input/2011_09_26/2011_09_26_drive_0001_sync/image_02/data/0000000000.png"
    assert dep_path.relative_to(root).as_posix() == \
        "gt_depth/2011_09_26_drive_0001_sync/proj_depth/groundtruth/image_02/0000000000.png"
    assert all("0000000003" not in str(p) for p, _ in ds.files)  # the None line
    for i in range(3):
        s = ds[i]
        label = s["label"].numpy()
        assert s["label"].dtype == torch.float32 and s["image"].shape == (3, 40, 72)
        assert s["meta"]["ori_size"] == (40, 72) and s["meta"]["ignore_index"] == 0
        np.testing.assert_allclose(label, _raw_png(ds.files[i][1]) / 256.0, rtol=1e-6)
        _, scene = fx.depth_scene(0, 0, i, (40, 72), 80.0, 0.12)
        _assert_matches_scene(label, scene, 1 / 256)
        assert 0.05 < (label > 0).mean() < 0.2  # sparse, LiDAR-like
    test = build_dataset(_cfg("kitti", root), "test", train=False)
    assert "drive_0002" in str(test.files[0][0]) and len(test) == 3
    with pytest.raises(DataError, match="kitti_eigen_val.txt"):  # no silent fallback to test
        build_dataset(_cfg("kitti", root), "val", train=False)


def test_nyu_layout_dense_millimetres(tmp_path):
    root = fx.write_nyu(tmp_path, n=3)
    ds = build_dataset(_cfg("nyu", root), "train", train=False)
    assert len(ds) == 3 and ds.depth_scale == 1000.0 and ds.skipped == 0
    assert ds.files[0][0].relative_to(root).as_posix() == "kitchen_0028a/rgb_00001.jpg"
    order = {str(p): k for k, (p, _) in enumerate(ds.files)}  # sorted by image path
    for i in range(3):
        scene_name = fx.NYU_SCENES["train"][i % 2]
        k = order[str(root / scene_name / f"rgb_{i * 7 + 1:05d}.jpg")]
        _, scene = fx.depth_scene(0, 0, i, (48, 64), 10.0)
        _assert_matches_scene(ds[k]["label"].numpy(), scene, 1 / 1000)
    test = build_dataset(_cfg("nyu", root), "test", train=False)
    assert {p.parent.name for p, _ in test.files} == {"bathroom", "bedroom"}


def test_sunrgbd_layout_is_evaluation_only(tmp_path):
    root = fx.write_sunrgbd(tmp_path, n=2)
    for split in ("val", "test"):
        ds = build_dataset(_cfg("sunrgbd", root), split, train=False)
        assert len(ds) == 2 and ds.depth_scale == 1000.0
    for i in range(2):
        _, scene = fx.depth_scene(0, 0, i, (48, 64), 8.0)
        _assert_matches_scene(ds[i]["label"].numpy(), scene, 1 / 1000)
    with pytest.raises(DataError, match="sunrgbd is for evaluation only") as e:
        build_dataset(_cfg("sunrgbd", root), "train", train=True)
    assert "\n" not in str(e.value)


def test_folder_layout_needs_scale_and_splits(tmp_path):
    root = fx.write_depth_folder(tmp_path / "a", n=10, scale=256.0)
    with pytest.raises(ConfigError, match="data.depth.depth_scale must be set"):
        build_dataset(_cfg("folder", root), "train", train=False)
    cfg = _cfg("folder", root, depth_scale=256.0)
    train, val = build_dataset(cfg, "train", False), build_dataset(cfg, "val", False)
    every = build_dataset(cfg, "all", False)
    assert (len(train), len(val), len(every)) == (8, 2, 10)
    assert not set(train.files) & set(val.files)
    assert any("extra" in str(p) for p, _ in every.files)
    k = next(j for j, (p, _) in enumerate(every.files) if p.name.startswith("img_001"))
    _, scene = fx.depth_scene(0, 0, 1, (40, 30), 10.0)
    _assert_matches_scene(every[k]["label"].numpy(), scene, 1 / 256)
    root = fx.write_depth_folder(tmp_path / "b", n=10, splits=True)
    cfg = _cfg("folder", root, depth_scale=1000.0)
    assert (len(build_dataset(cfg, "train", False)), len(build_dataset(cfg, "val", False))) == (8, 2)


def test_class_info_and_generated_via_build():
    cfg = _cfg("generated")
    cfg.data.gen_num_val = 4
    names, palette = class_info(cfg)
    assert names == ["depth"] and palette.tolist() == [[255, 255, 255]]
    cfg.data.class_names = ["d"]
    assert class_info(cfg)[0] == ["d"]  # explicit names still win
    ds = build_dataset(cfg, "val", train=False)
    assert isinstance(ds, GeneratedDepthDataset) and len(ds) == 4 and ds.depth_scale == 1000.0
    s = ds[1]
    assert s["image"].shape == (3, 64, 64) and s["label"].shape == (64, 64)
    lab = s["label"].numpy()
    assert lab.max() <= cfg.data.depth.max_depth and (lab >= 0).all()
    with pytest.raises(DataError, match="split must be train, val or test"):
        build_dataset(cfg, "all", train=False)


# --------------------------------------------------------------------------------------------
# one-line errors


def test_missing_list_depth_and_bad_depth_files(tmp_path):
    root = fx.write_kitti(tmp_path, n=2)
    (root / "kitti_eigen_test.txt").unlink()
    with pytest.raises(DataError, match=r"kitti_eigen_test.txt: split list not found") as e:
        build_dataset(_cfg("kitti", root), "test", train=False)
    assert "\n" not in str(e.value)
    gt = root / "gt_depth" / fx.KITTI_DRIVES["train"] / "proj_depth/groundtruth/image_02"
    (gt / "0000000001.png").unlink()
    with pytest.raises(DataError, match=r"0000000001.png: no depth map \(.*gt_depth.*not found\)"):
        build_dataset(_cfg("kitti", root), "train", train=False)
    assert any("no depth map" in p for p in check_dataset(root, "kitti"))
    nroot = fx.write_nyu(tmp_path / "nyu", n=2)
    dep = nroot / "kitchen_0028a" / "sync_depth_00001.png"
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(dep)
    ds = build_dataset(_cfg("nyu", nroot), "train", train=True)
    with pytest.raises(DataError, match=r"sync_depth_00001.png: depth map must be a single-channel"):
        ds[0]
    Image.fromarray(np.zeros((10, 12), np.uint16)).save(dep)
    with pytest.raises(DataError, match=r"sync_depth_00001.png: label size 10x12 differs from image"):
        ds[0]
    assert any("differs" in p for p in check_dataset(nroot, "nyu"))


def test_check_dataset_accepts_depth_layouts(tmp_path):
    assert check_dataset(fx.write_kitti(tmp_path / "k", n=1), "kitti") == []
    assert check_dataset(fx.write_nyu(tmp_path / "n", n=1), "nyu") == []
    assert check_dataset(fx.write_sunrgbd(tmp_path / "s", n=1), "sunrgbd") == []
    root = fx.write_depth_folder(tmp_path / "f", n=5)
    assert check_dataset(root, "depth_folder") == []
    Image.fromarray(np.zeros((4, 4), np.uint16)).save(root / "depth" / "orphan.png")
    assert any("orphan.png: depth map without image" in p for p in check_dataset(root, "depth_folder"))


# --------------------------------------------------------------------------------------------
# crops and the train pipeline


def test_kb_crop_takes_the_bottom_centre_window(tmp_path, monkeypatch):
    img = np.arange(10 * 13 * 3).reshape(10, 13, 3)
    dep = np.arange(10 * 13).reshape(10, 13).astype(np.float32)
    ci, cd = kb_crop(img, dep, size=(4, 6))
    np.testing.assert_array_equal(cd, dep[6:10, 3:9])  # top = 10 - 4, left = (13 - 6) // 2
    np.testing.assert_array_equal(ci, img[6:10, 3:9])
    with pytest.raises(ValueError, match="smaller than the crop"):
        kb_crop(img, dep, size=(11, 6))
    root = fx.write_kitti(tmp_path, n=1, size=(40, 72))
    cfg = _cfg("kitti", root, kb_crop=True)
    with pytest.raises(DataError, match=r"0000000000.png: image 40x72 is smaller than the crop "
                                        r"352x1216 \(data.depth.kb_crop\)"):
        build_dataset(cfg, "train", train=False)[0]
    monkeypatch.setattr(depth_mod, "KB_CROP_SIZE", (32, 64))
    ds = build_dataset(cfg, "train", train=False)
    s = ds[0]
    raw = _raw_png(ds.files[0][1]) / 256.0
    np.testing.assert_allclose(s["label"].numpy(), raw[8:40, 4:68], rtol=1e-6)
    assert s["meta"]["ori_size"] == (32, 64) and s["meta"]["img_size"] == (32, 64)
    img, depth, _ = ds.load(0)
    assert img.shape == (32, 64, 3) and depth.shape == (32, 64)
    # train samples are cropped the same way before augmentation
    assert build_dataset(_plain_train(cfg), "train", train=True)[0]["label"].shape == (32, 64)


def test_train_border_crop(tmp_path):
    root = fx.write_nyu(tmp_path, n=1)
    cfg = _plain_train(_cfg("nyu", root, train_border=(5, 35, 4, 60)))
    ds = build_dataset(cfg, "train", train=True)
    img, depth, _ = ds.load(0)
    s = ds[0]
    np.testing.assert_array_equal(s["label"].numpy(), depth[5:35, 4:60])
    mean, std = np.array(cfg.data.mean), np.array(cfg.data.std)
    back = s["image"].numpy().transpose(1, 2, 0) * std + mean
    np.testing.assert_allclose(back, img[5:35, 4:60], atol=1e-3)
    cfg.data.depth.train_border = (50, 60, 0, 10)
    with pytest.raises(ConfigError, match="leaves nothing of a 48x64 image"):
        build_dataset(cfg, "train", train=True)[0]


def test_rotation_is_nearest_for_depth_and_fills_zero():
    rng = np.random.default_rng(0)
    depth = np.where(rng.random((31, 41)) < 0.3, rng.uniform(1, 80, (31, 41)), 0).astype(np.float32)
    img = rng.integers(0, 256, (31, 41, 3), dtype=np.uint8)
    for angle in (2.5, -2.0, 30.0):
        ri, rd = rotate(img, depth, angle)
        assert rd.dtype == np.float32 and ri.dtype == np.uint8 and rd.shape == depth.shape
        assert ri.flags.writeable and rd.flags.writeable  # torch.from_numpy needs writable
        assert set(np.unique(rd)) <= set(np.unique(depth))  # no interpolated depths
        assert (rd == 0).any()
    _, rd = rotate(img, np.ones((31, 41), np.float32), 30.0)
    assert rd[0, 0] == 0 and rd[15, 20] == 1  # corners leave the frame: no depth
    ri, rd = rotate(img, depth, 0.0)
    np.testing.assert_array_equal(rd, depth)
    np.testing.assert_array_equal(ri, img)
    # 90 degrees clockwise (mmcv.imrotate's sign): a marker right of the centre goes below it
    marker = np.zeros((5, 5), np.float32)
    marker[2, 4] = 7.0
    _, rd = rotate(np.zeros((5, 5, 3), np.uint8), marker, 90.0)
    assert rd[4, 2] == 7.0 and rd.sum() == 7.0


def test_flip_and_crop_keep_image_and_depth_aligned():
    cfg = _cfg("generated")
    d = cfg.data
    d.depth.rotate = 0.0
    d.train_pipeline.photometric = False
    d.train_pipeline.flip_prob = 1.0
    d.train_pipeline.crop_size = (12, 20)
    d.size_divisor = 8
    cols = np.arange(40)
    img = np.zeros((30, 40, 3), np.uint8)
    img[..., 0] = cols * 5  # red encodes the column
    depth = np.tile(cols + 1.0, (30, 1)).astype(np.float32)
    depth[:, 7] = 0  # a no-GT column
    out_img, out_dep = depth_train_transform(img, depth, d, np.random.default_rng(3))
    assert out_img.shape == (16, 24, 3) and out_dep.shape == (16, 24)  # padded to 8s
    assert (out_dep[12:] == 0).all() and (out_dep[:, 20:] == 0).all() and (out_img[12:] == 0).all()
    red = out_img[:12, :20, 0] * d.std[0] + d.mean[0]
    col = np.round(red / 5).astype(int)
    valid = out_dep[:12, :20] > 0
    np.testing.assert_array_equal(out_dep[:12, :20][valid], col[valid] + 1)
    assert (col[~valid] == 7).all()
    assert (np.diff(col, axis=1) == -1).all()  # flipped: columns run backwards


def test_train_pipeline_pads_and_is_seeded(tmp_path):
    root = fx.write_depth_folder(tmp_path, n=6)
    cfg = _cfg("folder", root, depth_scale=1000.0)
    cfg.data.train_pipeline.crop_size = (24, 24)
    cfg.data.size_divisor = 16
    a, b = build_dataset(cfg, "all", True), build_dataset(cfg, "all", True)
    s = a[(2, 5)]
    assert s["image"].shape == (3, 32, 32) and s["label"].shape == (32, 32)
    assert (s["label"][24:] == 0).all() and (s["label"][:, 24:] == 0).all()
    assert torch.equal(s["image"], b[(2, 5)]["image"]) and torch.equal(s["label"], b[(2, 5)]["label"])
    assert torch.equal(a[2]["image"], b[2]["image"])
    assert not all(torch.equal(a[(2, k)]["image"], s["image"]) for k in range(6, 10))
    batch = next(iter(torch.utils.data.DataLoader(a, batch_size=3, collate_fn=collate)))
    assert batch["label"].dtype == torch.float32 and batch["label"].shape == (3, 32, 32)
    test = build_dataset(cfg, "all", False)  # sizes 40x30 and 36x48: padded with 0
    batch = collate([test[0], test[1]])
    assert batch["label"].shape == (2, 40, 48)
    sizes = [m["img_size"] for m in batch["meta"]]
    for k, (h, w) in enumerate(sizes):
        assert (batch["label"][k, h:] == 0).all() and (batch["label"][k, :, w:] == 0).all()


def test_color_augment_formula():
    img = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    out = color_augment(img, np.random.default_rng(1), (0.9, 1.1), (0.75, 1.25), (0.9, 1.1),
                        prob=1.0)
    rng = np.random.default_rng(1)
    rng.random()
    gamma, bright = rng.uniform(0.9, 1.1), rng.uniform(0.75, 1.25)
    colors = rng.uniform(0.9, 1.1, size=3)
    want = np.clip((img / 255.0) ** gamma * bright * colors, 0, 1) * 255
    np.testing.assert_allclose(out, want, atol=1e-3)
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 255
    np.testing.assert_allclose(color_augment(img, np.random.default_rng(1), prob=0.0), img,
                               atol=1e-4)


# --------------------------------------------------------------------------------------------
# the procedural renderer


def test_renderer_depth_is_exact_z_depth():
    for seed in range(6):
        scene = sample_depth_scene(np.random.default_rng(seed), 10.0)
        h, w = 48, 64
        _, depth, ids = render_scene_arrays(scene, (h, w))
        cam = scene.camera
        f = (w / 2) / np.tan(cam.hfov / 2)
        v = np.arange(h)[:, None] + 0.5 + np.zeros((1, w))
        # floor (y = 0) seen from height H with pitch p: Z = H f / ((v - cy) cos p + f sin p)
        floor = ids == 2
        assert floor.any()
        want = cam.height * f / ((v - h / 2) * np.cos(cam.pitch) + f * np.sin(cam.pitch))
        np.testing.assert_allclose(depth[floor], want[floor], rtol=1e-9)
        # back-projected points lie on their surfaces
        u = np.arange(w)[None, :] + 0.5 + np.zeros((h, 1))
        ray = np.stack([(u - w / 2) / f, (v - h / 2) / f, np.ones((h, w))], -1)
        finite = np.where(np.isfinite(depth), depth, 0.0)  # sky: inf
        pts = np.array([0, cam.height, 0]) + (finite[..., None] * ray) @ cam.rotation().T
        np.testing.assert_allclose(pts[ids == 4][:, 2], scene.z_back, rtol=1e-9)
        for k, obj in enumerate(scene.objects):
            m = ids == 6 + k
            if obj.kind == "sphere" and m.any():
                r = np.linalg.norm(pts[m] - obj.center, axis=1)
                np.testing.assert_allclose(r, obj.size[0], rtol=1e-9)


def test_renderer_range_determinism_and_density():
    for max_depth in (1.0, 10.0, 80.0):
        for seed in range(5):
            img, depth = render_depth_scene(np.random.default_rng(seed), (24, 32), max_depth)
            assert img.dtype == np.uint8 and img.shape == (24, 32, 3) and depth.dtype == np.float32
            valid = depth[depth > 0]
            assert valid.size > 0.5 * depth.size and valid.max() <= max_depth
    a = render_depth_scene(np.random.default_rng(7), (96, 128), 10.0)
    b = render_depth_scene(np.random.default_rng(7), (96, 128), 10.0)
    c = render_depth_scene(np.random.default_rng(8), (96, 128), 10.0)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    _, sparse = render_depth_scene(np.random.default_rng(7), (96, 128), 10.0, density=0.1)
    keep = sparse > 0
    assert 0.05 < keep.mean() < 0.15
    np.testing.assert_array_equal(sparse[keep], a[1][keep])  # a subset of the dense GT
    assert len(np.unique(np.nonzero(keep)[0])) < 96  # scan lines, not every row


def test_generated_dataset_is_a_function_of_seed_split_index():
    cfg = _cfg("generated", gen_density=0.3)
    cfg.data.gen_size = (32, 48)
    a = GeneratedDepthDataset(cfg.data, "val", train=False)
    b = GeneratedDepthDataset(cfg.data, "val", train=False, seed=5)
    assert torch.equal(a[2]["label"], b[2]["label"]) and torch.equal(a[2]["image"], b[2]["image"])
    assert not torch.equal(a[2]["label"], a[3]["label"])
    t = GeneratedDepthDataset(cfg.data, "test", train=False)
    assert not torch.equal(a[2]["label"], t[2]["label"])
    label = a[2]["label"]
    assert 0.1 < (label > 0).float().mean() < 0.4
    cfg.data.gen_seed = 1  # the datasets share cfg.data: a new gen_seed changes every scene
    assert not torch.equal(label, a[2]["label"])
