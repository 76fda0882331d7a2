"""Dataset loaders on tiny fixtures in each on-disk layout: pairing, label mapping, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from densediff.config import Config
from densediff.data import collate
from densediff.data.io import read_label
from densediff.errors import ConfigError, DataError
from densediff.tasks import build_dataset
from densediff.testing import fixtures as fx

IGN = 255


def _cfg(fmt, root=None, **data) -> Config:
    cfg = Config()
    cfg.data.dataset = fmt
    cfg.data.root = str(root) if root is not None else None
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def _raw_and_mapped(ds, i=0):
    raw = read_label(ds.files[i][1])
    return raw, ds[i]["label"].numpy()


# --------------------------------------------------------------------------------------------
# loaders and label mappings


def test_camvid_layout_and_void_to_ignore(tmp_path):
    root = fx.write_camvid(tmp_path, n=3)
    for split in ("train", "val", "test"):
        ds = build_dataset(_cfg("camvid", root), split, train=False)
        assert len(ds) == 3 and ds.num_classes == 11 and ds.palette.shape == (11, 3)
        assert ds.class_names[0] == "Sky" and ds.ignore_index == IGN
    raw, lab = _raw_and_mapped(ds)
    assert (raw == 11).any() and (lab[raw == 11] == IGN).all()
    np.testing.assert_array_equal(lab[raw < 11], raw[raw < 11])
    s = ds[0]
    assert s["image"].shape == (3, 36, 48) and s["image"].dtype == torch.float32
    assert s["meta"]["ori_size"] == (36, 48) and s["meta"]["path"].endswith("0001TP_000000.png")


def test_camvid_accepts_parent_folder(tmp_path):
    fx.write_camvid(tmp_path / "CamVid", n=2)
    assert len(build_dataset(_cfg("camvid", tmp_path), "val", train=False)) == 2


def test_ade20k_reduce_zero_label(tmp_path):
    root = fx.write_ade20k(tmp_path, n=2)
    ds = build_dataset(_cfg("ade20k", root), "train", train=False)
    assert len(ds) == 2 and ds.num_classes == 150 and ds.class_names[2] == "sky"
    raw, lab = _raw_and_mapped(ds)
    assert (raw == 0).any() and (lab[raw == 0] == IGN).all()
    np.testing.assert_array_equal(lab[raw > 0], raw[raw > 0] - 1)
    assert 149 in lab  # raw 150 -> class 149
    assert len(build_dataset(_cfg("ade20k", root), "val", train=False)) == 2
    with pytest.raises(DataError, match="ade20k has splits train and val"):
        build_dataset(_cfg("ade20k", root), "test", train=False)


def test_cityscapes_train_ids_and_label_ids_agree(tmp_path):
    a = fx.write_cityscapes(tmp_path / "a", n=2)
    b = fx.write_cityscapes(tmp_path / "b", n=2, train_ids=False)
    ds_a = build_dataset(_cfg("cityscapes", a), "train", train=False)
    ds_b = build_dataset(_cfg("cityscapes", b), "train", train=False)
    assert len(ds_a) == 2 and ds_a.num_classes == 19
    assert ds_a.files[0][1].name.endswith("_gtFine_labelTrainIds.png")
    assert ds_b.files[0][1].name.endswith("_gtFine_labelIds.png")
    for i in range(2):
        la, lb = ds_a[i]["label"], ds_b[i]["label"]
        assert torch.equal(la, lb) and IGN in la and set(la.unique().tolist()) <= set(range(19)) | {IGN}
    test = build_dataset(_cfg("cityscapes", a), "test", train=False)
    assert (test[0]["label"] == IGN).all()


def test_ignore_index_setting_is_applied(tmp_path):
    root = fx.write_cityscapes(tmp_path, n=1)
    ds = build_dataset(_cfg("cityscapes", root, ignore_index=-1), "train", train=True)
    lab = ds[0]["label"]
    assert ds.ignore_index == -1 and -1 in lab and IGN not in lab


def test_folder_default_split_and_classes(tmp_path):
    root = fx.write_folder(tmp_path, n=10)
    train = build_dataset(_cfg("folder", root), "train", train=False)
    val = build_dataset(_cfg("folder", root), "val", train=False)
    test = build_dataset(_cfg("folder", root), "test", train=False)
    every = build_dataset(_cfg("folder", root), "all", train=False)
    assert (len(train), len(val), len(every)) == (8, 2, 10)
    assert val.files == test.files and not set(train.files) & set(val.files)
    assert train.class_names == ["sky", "ground", "disc", "square", "triangle", "ring"]
    assert train.palette[0].tolist() == [70, 130, 180]
    sizes = {every[i]["meta"]["ori_size"] for i in range(len(every))}
    assert sizes == {(36, 48), (40, 30)}  # any image size
    assert any("extra" in str(p) for p, _ in every.files)  # subfolders


def test_folder_split_files(tmp_path):
    root = fx.write_folder(tmp_path, n=10, splits=True)
    train = build_dataset(_cfg("folder", root), "train", train=False)
    val = build_dataset(_cfg("folder", root), "val", train=False)
    assert (len(train), len(val)) == (8, 2)
    assert val.files[0][0].stem == "img_000"
    (root / "splits" / "val.txt").write_text("img_000\nmissing_one\n")
    with pytest.raises(DataError, match=r"val.txt:2: no image for 'missing_one'"):
        build_dataset(_cfg("folder", root), "val", train=False)


def test_folder_without_classes_file(tmp_path):
    root = fx.write_folder(tmp_path, n=5)
    (root / "classes.txt").unlink()
    with pytest.raises(DataError, match="classes.txt: not found.*data.num_classes"):
        build_dataset(_cfg("folder", root), "train", train=False)
    ds = build_dataset(_cfg("folder", root, num_classes=6), "train", train=False)
    assert ds.class_names[5] == "class_5" and ds.palette.shape == (6, 3)


def test_bad_classes_file(tmp_path):
    root = fx.write_folder(tmp_path, n=5)
    (root / "classes.txt").write_text("sky 1 2 3\nroad 1 2 300\n")
    with pytest.raises(DataError, match=r"classes.txt:2: colour components must be 0..255"):
        build_dataset(_cfg("folder", root), "train", train=False)


def test_generated_via_build(tmp_path):
    ds = build_dataset(_cfg("generated", gen_num_val=5), "val", train=False)
    assert len(ds) == 5 and ds.num_classes == 6


# --------------------------------------------------------------------------------------------
# root and config checks


def test_root_from_env_var(tmp_path, monkeypatch):
    root = fx.write_camvid(tmp_path, n=1)
    monkeypatch.setenv("DENSEDIFF_CAMVID_ROOT", str(root))
    assert len(build_dataset(_cfg("camvid"), "train", train=False)) == 1
    monkeypatch.delenv("DENSEDIFF_CAMVID_ROOT")
    with pytest.raises(DataError, match=r"set data.root or \$DENSEDIFF_CAMVID_ROOT"):
        build_dataset(_cfg("camvid"), "train", train=False)
    with pytest.raises(DataError, match="nowhere: dataset folder not found"):
        build_dataset(_cfg("ade20k", tmp_path / "nowhere"), "train", train=False)


def test_num_classes_and_ignore_index_checked(tmp_path):
    root = fx.write_camvid(tmp_path, n=1)
    with pytest.raises(ConfigError, match="data.num_classes=12 but dataset 'camvid' has 11"):
        build_dataset(_cfg("camvid", root, num_classes=12), "train", train=False)
    with pytest.raises(ConfigError, match="data.ignore_index=3 collides"):
        build_dataset(_cfg("camvid", root, ignore_index=3), "train", train=False)


# --------------------------------------------------------------------------------------------
# bad data: one-line DataError naming the file


def test_label_size_mismatch_names_file(tmp_path):
    root = fx.write_camvid(tmp_path, n=2)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "trainannot" / "0001TP_000001.png")
    ds = build_dataset(_cfg("camvid", root), "train", train=True)
    ds[0]  # the intact pair loads
    with pytest.raises(DataError, match=r"trainannot/0001TP_000001.png: label size 10x10 differs"):
        ds[1]


def test_label_value_out_of_range_names_file(tmp_path):
    root = fx.write_camvid(tmp_path, n=1)
    lab = np.zeros((36, 48), np.uint8)
    lab[3, 3], lab[4, 4] = 12, 200
    Image.fromarray(lab).save(root / "valannot" / "0001TP_000000.png")
    ds = build_dataset(_cfg("camvid", root), "val", train=False)
    with pytest.raises(DataError, match=r"0001TP_000000.png: label values 12, 200 are outside the "
                                        r"valid values 0..11") as e:
        ds[0]
    assert "\n" not in str(e.value)


def test_missing_and_empty_folders(tmp_path):
    root = fx.write_camvid(tmp_path / "cv", n=1)
    for p in (root / "valannot").iterdir():
        p.unlink()
    (root / "valannot").rmdir()
    with pytest.raises(DataError, match="valannot: folder not found"):
        build_dataset(_cfg("camvid", root), "val", train=False)
    froot = fx.write_folder(tmp_path / "f", n=3)
    for p in sorted((froot / "images").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    with pytest.raises(DataError, match="images: no images"):
        build_dataset(_cfg("folder", froot), "train", train=False)


def test_image_without_label_names_image(tmp_path):
    root = fx.write_folder(tmp_path, n=6)
    (root / "masks" / "img_001.png").unlink()
    with pytest.raises(DataError, match=r"images/img_001.png: no mask"):
        build_dataset(_cfg("folder", root), "train", train=False)
    root = fx.write_ade20k(tmp_path / "ade", n=2)
    (root / "annotations" / "training" / "ADE_train_00000002.png").unlink()
    with pytest.raises(DataError, match=r"ADE_train_00000002.jpg: no label"):
        build_dataset(_cfg("ade20k", root), "train", train=False)


# --------------------------------------------------------------------------------------------
# items, seeds, batching


def test_item_seed_determinism(tmp_path):
    root = fx.write_camvid(tmp_path, n=2)
    cfg = _cfg("camvid", root)
    cfg.data.train_pipeline.scale = (36, 48)
    cfg.data.train_pipeline.crop_size = (24, 24)
    a, b = build_dataset(cfg, "train", True), build_dataset(cfg, "train", True)
    assert torch.equal(a[(1, 5)]["image"], b[(1, 5)]["image"])
    assert torch.equal(a[(1, 5)]["label"], b[(1, 5)]["label"])
    assert not torch.equal(a[(1, 5)]["image"], a[(1, 6)]["image"])
    assert torch.equal(a[1]["image"], b[1]["image"])  # int items: default_rng([cfg.seed, index])
    cfg.seed = 1
    assert not torch.equal(a[1]["image"], build_dataset(cfg, "train", True)[1]["image"])


def test_dataloader_batches(tmp_path):
    root = fx.write_folder(tmp_path, n=6)
    cfg = _cfg("folder", root)
    cfg.data.train_pipeline.crop_size = (32, 32)
    train = build_dataset(cfg, "all", train=True)
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=3, collate_fn=collate)))
    assert batch["image"].shape == (3, 3, 32, 32) and batch["label"].dtype == torch.int64
    test = build_dataset(cfg, "all", train=False)  # mixed sizes: padded to the largest
    batch = next(iter(torch.utils.data.DataLoader(test, batch_size=2, collate_fn=collate)))
    assert batch["image"].shape == (2, 3, 40, 48) and batch["label"].shape == (2, 40, 48)
    assert [m["img_size"] for m in batch["meta"]] == [(40, 30), (36, 48)]  # extra/ sorts first
