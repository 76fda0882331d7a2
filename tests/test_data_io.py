"""densediff.data.io: image/label reading, conversions and one-line errors naming the file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from densediff.data.io import image_size, read_image, read_label
from densediff.errors import DataError


def _rgb(h=6, w=8):
    return (np.arange(h * w * 3) % 256).astype(np.uint8).reshape(h, w, 3)


def test_rgb_roundtrip_and_header_size(tmp_path):
    a = _rgb()
    Image.fromarray(a).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (6, 8, 3)
    np.testing.assert_array_equal(out, a)
    assert image_size(tmp_path / "a.png") == (6, 8)


def test_gray_rgba_palette_become_rgb(tmp_path):
    g = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    Image.fromarray(g, "L").save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (6, 8, 3)
    np.testing.assert_array_equal(out[..., 1], g)

    rgba = np.concatenate([_rgb(), np.full((6, 8, 1), 7, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), _rgb())

    p = Image.fromarray(np.zeros((6, 8), np.uint8), "P")
    p.putpalette([10, 20, 30] + [0] * 765)
    p.save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png")[0, 0].tolist() == [10, 20, 30]


def test_16bit_image_scaled_to_8bit(tmp_path):
    a = np.array([[0, 257 * 100, 65535]], np.uint16)
    Image.fromarray(a).save(tmp_path / "d.png")  # 16-bit greyscale PNG
    out = read_image(tmp_path / "d.png")
    assert out.dtype == np.uint8 and out.shape == (1, 3, 3)
    assert out[0, :, 0].tolist() == [0, 100, 255]


def test_truncated_image_names_file(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.png: truncated or corrupt") as e:
        read_image(path)
    assert "\n" not in str(e.value)


def test_not_an_image_and_missing(tmp_path):
    (tmp_path / "x.png").write_text("hello")
    with pytest.raises(DataError, match="x.png: not an image"):
        read_image(tmp_path / "x.png")
    with pytest.raises(DataError, match="nope.png: file not found"):
        read_label(tmp_path / "nope.png")


def test_read_label_modes(tmp_path):
    lab = np.array([[0, 3], [11, 255]], np.uint8)
    Image.fromarray(lab, "L").save(tmp_path / "l.png")
    out = read_label(tmp_path / "l.png")
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, lab)
    Image.fromarray(np.array([[0, 300], [1000, 7]], np.uint16)).save(tmp_path / "l16.png")
    assert read_label(tmp_path / "l16.png").tolist() == [[0, 300], [1000, 7]]


def test_rgb_label_rejected(tmp_path):
    Image.fromarray(_rgb()).save(tmp_path / "rgbmask.png")
    with pytest.raises(DataError, match="rgbmask.png: label map must be a single-channel"):
        read_label(tmp_path / "rgbmask.png")
