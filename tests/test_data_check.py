"""check_dataset: clean fixtures pass, and every problem of a broken one is listed."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from densediff.data.check import check_dataset
from densediff.errors import DataError
from densediff.testing import fixtures as fx


@pytest.mark.parametrize("fmt", ["camvid", "ade20k", "cityscapes", "folder"])
def test_clean_fixture_has_no_problems(tmp_path, fmt):
    root = getattr(fx, f"write_{fmt}")(tmp_path)
    assert check_dataset(root, fmt) == []


def test_camvid_lists_every_problem(tmp_path):
    root = fx.write_camvid(tmp_path, n=4)
    img = root / "train" / "0001TP_000000.png"
    img.write_bytes(img.read_bytes()[:200])  # truncated
    (root / "trainannot" / "0001TP_000001.png").unlink()  # image without label
    bad = np.zeros((36, 48), np.uint8)
    bad[5, 5] = 40
    Image.fromarray(bad).save(root / "valannot" / "0001TP_000002.png")  # value out of range
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(root / "testannot" / "0001TP_000003.png")
    Image.fromarray(np.zeros((36, 48, 3), np.uint8)).save(root / "testannot" / "0001TP_000001.png")
    Image.fromarray(np.zeros((36, 48), np.uint8)).save(root / "valannot" / "stray.png")

    problems = check_dataset(root, "camvid")
    expected = [
        ("train/0001TP_000000.png", "truncated or corrupt"),
        ("train/0001TP_000001.png", "no label"),
        ("valannot/0001TP_000002.png", "label values 40 are outside"),
        ("testannot/0001TP_000003.png", "label size 9x9 differs"),
        ("testannot/0001TP_000001.png", "single-channel"),
        ("valannot/stray.png", "label without image"),
    ]
    for name, what in expected:
        assert any(name in p and what in p for p in problems), (name, problems)
    assert len(problems) == len(expected)
    assert all("\n" not in p for p in problems)


def test_folder_problems(tmp_path):
    root = fx.write_folder(tmp_path, n=6, splits=True)
    (root / "classes.txt").write_text("a\na\n")
    (root / "masks" / "img_002.png").unlink()
    (root / "splits" / "val.txt").write_text("img_000\nghost\n")
    problems = check_dataset(root, "folder")
    assert any("classes.txt:2: duplicate class name 'a'" in p for p in problems)
    assert any("img_002" in p and "no mask" in p for p in problems)
    assert any("val.txt:2: no image for 'ghost'" in p for p in problems)


def test_missing_root_and_bad_format(tmp_path):
    assert check_dataset(tmp_path / "nope", "ade20k") == [f"{tmp_path / 'nope'}: dataset folder not found"]
    problems = check_dataset(tmp_path, "cityscapes")
    assert any("leftImg8bit/train: folder not found" in p for p in problems)
    assert any("gtFine/val: folder not found" in p for p in problems)
    with pytest.raises(DataError, match="unknown dataset format"):
        check_dataset(tmp_path, "voc")
