"""Reading images and label maps, with one-line :class:`DataError` messages for bad files.

Images come back as RGB ``uint8`` arrays (H x W x 3) whatever the file holds: greyscale and
palette images are expanded, an alpha channel is dropped, 16-bit data are scaled to 8 bits
(``v * 255 / 65535``, the same for every image so a dataset stays consistent). Label maps must be
single-channel class-id images (8-bit, palette indices, or 16-bit) and come back as ``int64``.
EXIF orientation tags are not applied: pixels are used as stored, so images and label maps
stay aligned.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    from densediff.data.classes import ColourMap

from densediff.errors import DataError, UserError, one_line
from densediff.limits import MAX_PIXELS_ENV, MAX_PIXELS_LIMIT
from densediff.utils.checks import env_int, path_kind

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
"""File suffixes taken as images when listing folders (case-insensitive)."""

LABEL_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")
"""File suffixes taken as label maps (lossless formats only)."""

_LABEL_MODES = ("L", "P", "1", "I", "I;16", "I;16L", "I;16B", "I;16N")

DEFAULT_MAX_PIXELS = 50_000_000
"""Images with more pixels than this (default 50 M, e.g. 8660 x 5773) are refused from their
header, before decoding: a small compressed file can decode to gigabytes. Set the environment
variable ``DENSEDIFF_MAX_IMAGE_PIXELS`` to raise it (0: no limit; trusted files only)."""




def max_image_pixels() -> int:
    """The decoded-pixel limit: ``$DENSEDIFF_MAX_IMAGE_PIXELS`` or :data:`DEFAULT_MAX_PIXELS`
    (0 = no limit)."""
    try:
        return env_int(MAX_PIXELS_ENV, DEFAULT_MAX_PIXELS, 0, MAX_PIXELS_LIMIT)
    except UserError as e:
        raise DataError(f"{e} (0: no limit)") from None


def _open(path: str | os.PathLike) -> Image.Image:
    """Open an image lazily (header only); DataError when missing or not an image."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not an image file")
    if not path.is_file():
        kind = path_kind(path)
        raise DataError(f"{path}: file not found" if kind == "missing"
                        else f"{path}: is {kind}, not an image file")
    limit = max_image_pixels()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # our own limit (below) replaces Pillow's when it is raised above it
            if limit == 0 or limit > (Image.MAX_IMAGE_PIXELS or 0):
                Image.MAX_IMAGE_PIXELS = None if limit == 0 else limit
            im = Image.open(path)
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image file (or a format Pillow cannot read)") from None
    except Image.DecompressionBombError:
        raise DataError(f"{path}: image too large to decode safely; set {MAX_PIXELS_ENV} "
                        "higher if the file is trusted") from None
    except OSError as e:
        raise DataError(f"{path}: cannot open ({one_line(e)})") from None
    if limit and im.width * im.height > limit:
        im.close()
        raise DataError(f"{path}: {im.width}x{im.height} = {im.width * im.height / 1e6:.1f} M "
                        f"pixels once decoded, above the limit of {limit / 1e6:g} M; set "
                        f"{MAX_PIXELS_ENV} higher (0: no limit) if the file is trusted")
    return im


def _load(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image; DataError on truncated or corrupt data."""
    im = _open(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.load()
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: truncated or corrupt image ({msg})") from None
    return im


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image file, read from its header only (fast)."""
    with _open(path) as im:
        return im.height, im.width


def _to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Scale a high-bit-depth single-channel array to uint8."""
    if mode == "F":
        a = a.astype(np.float64)
        a = a * 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else a  # [0, 1] floats or 0..255
        return np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)
    # integer modes ("I;16*" or 32-bit "I", which Pillow also uses for 16-bit PNGs)
    a = a.astype(np.int64)
    if mode.startswith("I;16") or a.max(initial=0) > 255:
        a = np.clip(a, 0, 65535) * 255 // 65535
    return np.clip(a, 0, 255).astype(np.uint8)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as RGB ``uint8`` (H x W x 3).

    Greyscale, palette, RGBA/LA (alpha dropped), CMYK and 16-bit/float images are converted.

    Raises:
        DataError: the file is missing, not an image, truncated or corrupt.
    """
    im = _load(path)
    if im.mode in ("RGB",):
        return np.asarray(im, dtype=np.uint8).copy()
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        g = _to_uint8(np.asarray(im), im.mode)
        return np.repeat(g[:, :, None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
    try:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: cannot convert image mode {im.mode} to RGB ({e})") from None


def read_label(path: str | os.PathLike, colours: ColourMap | None = None) -> np.ndarray:
    """Read a label map as ``int64`` (H x W) of raw pixel values (no class mapping).

    Accepts 8-bit greyscale, palette (the indices are the values) and 16-bit images; with
    ``colours`` (a folder dataset whose ``classes.txt`` gives the colours) also colour-coded
    RGB(A) masks, mapped to class ids (:meth:`~densediff.data.classes.ColourMap.map`).

    Raises:
        DataError: missing/unreadable/truncated file, not a single-channel image (an RGB
            mask without ``colours``), or a colour that is not in ``colours``.
    """
    im = _load(path)
    if im.mode in ("RGB", "RGBA") and colours is not None:
        return colours.map(np.asarray(im.convert("RGB")), path)
    if im.mode not in _LABEL_MODES:
        raise DataError(
            f"{path}: label map must be a single-channel class-id image, got mode {im.mode}"
            " (colour-coded masks: a folder dataset whose classes.txt gives every class's "
            "colour, 'name R G B')")
    return np.asarray(im).astype(np.int64)


def check_same_size(img_path: str | os.PathLike, img_size: tuple[int, int],
                    label_path: str | os.PathLike, label_size: tuple[int, int]) -> None:
    """DataError naming the label file when an image and its label differ in (h, w)."""
    if tuple(img_size) != tuple(label_size):
        raise DataError(f"{label_path}: label size {label_size[0]}x{label_size[1]} differs from "
                        f"image {img_path} size {img_size[0]}x{img_size[1]}")


def write_image(path: str | os.PathLike, img: np.ndarray) -> None:
    """Write a uint8 RGB (H x W x 3) or single-channel uint8 array; parent folders are made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"quality": 95} if path.suffix.lower() in (".jpg", ".jpeg") else {}
    Image.fromarray(np.ascontiguousarray(img)).save(path, **kwargs)


def as_uint8_rgb(image) -> np.ndarray:
    """An image given as a path, a PIL image or an HxW[x1|3|4] array of numbers as a uint8
    RGB array (grayscale and RGBA converted; 16-bit and float values scaled as files are);
    DataError naming what is wrong."""
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise DataError(f"image array must be HxW, HxWx3 or HxWx4, got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise DataError(f"image array must hold numbers, got dtype {arr.dtype}")
    limit = max_image_pixels()
    if min(arr.shape[:2]) < 1 or (limit and arr.shape[0] * arr.shape[1] > limit):
        raise DataError(f"image array of {arr.shape[0]}x{arr.shape[1]} pixels: must be at "
                        f"least 1x1 and at most {limit} pixels ({MAX_PIXELS_ENV})")
    arr = np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr[..., :3]
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype == np.uint16:
        arr = _to_uint8(arr, "I;16")          # 16-bit: scaled like 16-bit files
    elif np.issubdtype(arr.dtype, np.floating):
        arr = _to_uint8(arr, "F")             # floats: [0, 1] or 0..255
    elif arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)
