"""Monocular depth data (``task: depth``): layouts, depth-map reading, pipelines, datasets.

A depth sample is an RGB image and a depth map in metres of the same size, where 0 means "no
ground truth" (no LiDAR point, sky, a sensor hole). Depth PNGs store ``metres x depth_scale``
as 16-bit (or 8-bit) integers; :func:`read_depth` divides by the scale.

Layouts (``root`` is the dataset folder; list files are those of the DepthFormer toolbox,
zhyever/Monocular-Depth-Estimation-Toolbox, ``splits/``, which are the BTS lists):

kitti (Eigen split, as BTS / DepthFormer use it)
    ``root/input/<date>/<date>_drive_<XXXX>_sync/image_02/data/<frame>.png`` (KITTI raw) and
    ``root/gt_depth/<date>_drive_<XXXX>_sync/proj_depth/groundtruth/image_02/<frame>.png`` (the
    KITTI depth benchmark's annotated depth: 16-bit PNG, metres = value / 256, 0 = no point).
    List files at the root, one sample a line ``<image path relative to input/> <depth path
    relative to gt_depth/, or None> <focal>``, e.g. ``2011_09_26/2011_09_26_drive_0002_sync/
    image_02/data/0000000069.png 2011_09_26_drive_0002_sync/proj_depth/groundtruth/image_02/
    0000000069.png 721.5377``. Split ``s`` reads ``kitti_eigen_<s>.txt`` (the toolbox ships
    ``kitti_eigen_train.txt`` and ``kitti_eigen_test.txt``; it validates on the Eigen test
    split, which the shipped configs follow with ``data.val_split: test``; ``val`` reads
    ``kitti_eigen_val.txt``, a held-out list of your own). Default depth scale 256.
nyu (NYU Depth v2, the BTS ``sync`` subset and the official 654 test images)
    ``root/<scene>/rgb_<n>.jpg`` and ``root/<scene>/sync_depth_<n>.png`` (16-bit, metres =
    value / 1000, dense), e.g. ``root/kitchen_0028a/rgb_00045.jpg``; the test images in
    ``root/<scene type>/`` (``bathroom/rgb_00045.jpg``). Lists ``nyu_<split>.txt`` with lines
    ``/kitchen_0028b/rgb_00045.jpg /kitchen_0028b/sync_depth_00045.png 518.8579`` (paths
    relative to root; a leading ``/`` is ignored); ``val`` reads ``nyu_val.txt`` (none is
    shipped: the configs validate on the test list as the toolbox does). Default depth scale
    1000.
sunrgbd (SUN RGB-D, evaluation only: there is no training list)
    ``root/SUNRGBD/<sensor>/<...>/image/<id>.jpg`` and ``.../depth/<id>.png``; the list
    ``root/SUNRGBD_val_splits.txt`` has lines ``SUNRGBD/kv2/kinect2data/<seq>/image/
    0000103.jpg SUNRGBD/kv2/kinect2data/<seq>/depth/0000103.png`` (no focal). Splits ``val``
    and ``test`` read it; ``train`` is a DataError. SUN RGB-D depth PNGs store millimetres
    rotated by 3 bits; as the SUN RGB-D toolbox (``readData/read3dPoints.m``: ``bitor(
    bitshift(depthVis,-3), bitshift(depthVis,16-3))/1000``) does, metres =
    ``(((d >> 3) | (d << 13)) & 0xFFFF) / 1000``. (That toolbox, and the DepthFormer toolbox's
    evaluation, then cap depth at 8 m; here depth is not clipped, the metrics apply
    ``data.depth.max_depth``.) Default depth scale 1000 (after the rotation).
folder (your own data)
    ``root/images/`` (any of .jpg .jpeg .png .bmp .tif .tiff .webp, subfolders allowed) and
    ``root/depth/`` with one single-channel 16-bit (or 8-bit) PNG per image, same relative
    path and stem: metres = value / ``data.depth.depth_scale`` (required), 0 = no depth.
    Splits as the segmentation folder layout (:mod:`densediff.data.layouts`):
    ``splits/<split>.txt`` listing stems, else every 5th sorted stem (0, 5, ...) is val/test
    and the rest train; ``all`` is every image.

In every list file blank lines are skipped, and an entry whose depth is ``None`` is skipped and
counted (``DepthDataset.skipped``, shown in its repr). A split name ending in ``.txt`` names a
list file in root directly (e.g. ``kitti_benchmark_val.txt``). Samples are sorted by image path,
as in the toolbox.

Pipelines. Loading applies the KITTI benchmark (KB) crop when ``data.depth.kb_crop``: the
bottom-centre 352 x 1216 window of image and depth (:func:`kb_crop`). Training then runs, with
the sample's RNG: ``data.depth.train_border`` crop, random rotation (probability 0.5, U(-rotate,
rotate) degrees; image bilinear, depth nearest, 0 outside the frame), horizontal flip
(``train_pipeline.flip_prob``), random crop to ``train_pipeline.crop_size``, BTS colour
augmentation (when ``train_pipeline.photometric``; probability 0.5), normalisation, and padding
to ``crop_size`` and ``size_divisor`` (image 0, depth 0). Testing resizes the image into
``data.test_scale`` (if set) and normalises it; the depth keeps its loaded size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from densediff.data.datasets import SegDataset
from densediff.data.io import _load, check_same_size, read_image
from densediff.data.layouts import pair_folder
from densediff.data.transforms import (
    normalize,
    pad,
    random_crop,
    random_flip,
)
from densediff.errors import ConfigError, DataError
from densediff.utils.checks import read_text

if TYPE_CHECKING:
    from densediff.config import DataConfig

DEPTH_FORMATS = ("kitti", "nyu", "sunrgbd", "folder")
DEFAULT_DEPTH_SCALE = {"kitti": 256.0, "nyu": 1000.0, "sunrgbd": 1000.0}
"""PNG value per metre of each dataset (folder: ``data.depth.depth_scale``, no default)."""
KB_CROP_SIZE = (352, 1216)
"""(h, w) of the KITTI benchmark crop."""
DEPTH_EXTENSIONS = (".png",)
DEPTH_CLASS_NAMES = ["depth"]
DEPTH_PALETTE = np.array([[255, 255, 255]], np.uint8)
_DEPTH_MODES = ("L", "I", "I;16", "I;16L", "I;16B", "I;16N")


# --------------------------------------------------------------------------------------------
# reading


def read_depth(path: str | os.PathLike, scale: float, sunrgbd: bool = False) -> np.ndarray:
    """Read a depth PNG as float32 metres (H x W): ``value / scale``; 0 stays 0 (no depth).

    Args:
        path: a single-channel 16-bit or 8-bit image.
        scale: stored value per metre (KITTI 256, NYU 1000).
        sunrgbd: undo SUN RGB-D's 3-bit rotation first: ``((d >> 3) | (d << 13)) & 0xFFFF``.

    Raises:
        DataError: missing, unreadable or truncated file, or not a single-channel image.
    """
    im = _load(path)
    if im.mode not in _DEPTH_MODES:
        raise DataError(f"{path}: depth map must be a single-channel 16-bit or 8-bit image, got "
                        f"mode {im.mode}")
    raw = np.asarray(im)
    if raw.dtype.kind not in "ui" or (raw.size and (raw.min() < 0 or raw.max() > 65535)):
        raise DataError(f"{path}: depth values must be integers in 0..65535")
    if sunrgbd:
        d = raw.astype(np.uint32)
        raw = ((d >> 3) | (d << 13)) & 0xFFFF
    return (raw.astype(np.float64) / scale).astype(np.float32)


def encode_depth(depth: np.ndarray, scale: float, sunrgbd: bool = False) -> np.ndarray:
    """Metres -> uint16 PNG values (``round(depth * scale)``, clipped to 0..65535), the
    inverse of :func:`read_depth` (with ``sunrgbd``: rotated left by 3 bits)."""
    v = np.clip(np.round(np.asarray(depth, np.float64) * scale), 0, 65535).astype(np.uint32)
    if sunrgbd:
        v = ((v << 3) | (v >> 13)) & 0xFFFF
    return v.astype(np.uint16)


# --------------------------------------------------------------------------------------------
# transforms


def kb_crop(img: np.ndarray, depth: np.ndarray | None, size: tuple[int, int] = KB_CROP_SIZE
            ) -> tuple[np.ndarray, np.ndarray | None]:
    """The KITTI benchmark crop: the ``size`` (h, w) window at the bottom, centred horizontally:
    rows ``H - h .. H``, columns from ``(W - w) // 2``.

    Raises:
        ValueError: the image is smaller than ``size``.
    """
    H, W = img.shape[:2]
    h, w = size
    if H < h or W < w:
        raise ValueError(f"image {H}x{W} is smaller than the crop {h}x{w}")
    top, left = H - h, (W - w) // 2
    return (img[top:top + h, left:left + w],
            None if depth is None else depth[top:top + h, left:left + w])


def border_crop(img: np.ndarray, depth: np.ndarray, border: tuple[int, int, int, int]
                ) -> tuple[np.ndarray, np.ndarray]:
    """Keep rows ``top:bottom`` and columns ``left:right`` (``border = (top, bottom, left,
    right)``, numpy slice semantics) of image and depth.

    Raises:
        ConfigError: nothing of the image is left.
    """
    top, bottom, left, right = border
    h, w = depth.shape
    img, depth = img[top:bottom, left:right], depth[top:bottom, left:right]
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ConfigError(f"data.depth.train_border={tuple(border)} leaves nothing of a "
                          f"{h}x{w} image")
    return img, depth


def rotate(img: np.ndarray, depth: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate image and depth by ``angle`` degrees about the image centre, keeping the size, as
    ``mmcv.imrotate`` (positive angle = clockwise on screen), with Pillow: the image bilinear,
    the depth with the nearest source pixel (depth values are never mixed: every output depth
    is a source depth), 0 outside the frame for both."""
    if angle == 0:
        return img, depth
    ri = Image.fromarray(img).rotate(-angle, resample=Image.BILINEAR, fillcolor=(0,) * 3)
    rd = Image.fromarray(np.asarray(depth, np.float32)).rotate(  # mode F
        -angle, resample=Image.NEAREST, fillcolor=0.0)
    return np.array(ri), np.array(rd, dtype=depth.dtype)  # writable copies


def random_rotate(img: np.ndarray, depth: np.ndarray, degree: float, rng: np.random.Generator,
                  prob: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """With probability ``prob`` :func:`rotate` by U(-degree, degree) degrees (as the toolbox's
    ``RandomRotate``, both numbers are always drawn); ``degree == 0`` draws nothing."""
    if degree <= 0:
        return img, depth
    do = rng.random() < prob
    angle = rng.uniform(-degree, degree)
    return rotate(img, depth, angle) if do else (img, depth)


def color_augment(img: np.ndarray, rng: np.random.Generator,
                  gamma_range: tuple[float, float] = (0.9, 1.1),
                  brightness_range: tuple[float, float] = (0.75, 1.25),
                  color_range: tuple[float, float] = (0.9, 1.1),
                  prob: float = 0.5) -> np.ndarray:
    """BTS colour augmentation; returns float32 H x W x 3 on the 0..255 scale.

    With probability ``prob``, on ``x = img / 255``: ``x ** gamma`` (gamma ~ U(gamma_range)),
    times a brightness ~ U(brightness_range), times per-channel colour factors ~
    U(color_range) (3 draws), clipped to [0, 1]; then back to 0..255 (not rounded).
    """
    x = img.astype(np.float32) / 255.0
    if rng.random() < prob:
        gamma = rng.uniform(*gamma_range)
        brightness = rng.uniform(*brightness_range)
        colors = rng.uniform(*color_range, size=3)
        x = np.clip((x ** gamma) * brightness * colors.astype(np.float32), 0.0, 1.0)
    return (x * 255.0).astype(np.float32)


def depth_train_transform(img: np.ndarray, depth: np.ndarray, data: DataConfig,
                          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The depth training pipeline (after loading and the KB crop), in this order: border crop
    (``data.depth.train_border``), :func:`random_rotate` (``data.depth.rotate``), flip
    (``train_pipeline.flip_prob``), random crop (``train_pipeline.crop_size``), BTS colour
    augmentation (if ``train_pipeline.photometric``), normalise, pad to ``crop_size`` and
    ``size_divisor`` (image 0, depth 0).

    Returns the normalised float32 image (H x W x 3) and the float32 depth (H x W).
    """
    p, dd = data.train_pipeline, data.depth
    if p.scale is not None:
        raise ConfigError("data.train_pipeline.scale must be unset for depth")
    if dd.train_border is not None:
        img, depth = border_crop(img, depth, dd.train_border)
    img, depth = random_rotate(img, depth, dd.rotate, rng)
    img, depth = random_flip(img, depth, p.flip_prob, rng)
    if p.crop_size is not None:
        img, depth = random_crop(img, depth, p.crop_size, 1.0, 0, rng)
    if p.photometric:
        img = color_augment(img, rng, dd.gamma_range, dd.brightness_range, dd.color_range)
    img = normalize(img, data.mean, data.std)
    img, depth = pad(img, depth, p.crop_size, data.size_divisor, ignore_index=0)
    return img, np.ascontiguousarray(depth, np.float32)


# --------------------------------------------------------------------------------------------
# datasets


class DepthDataset(SegDataset):
    """Image/depth pairs read from disk, run through the depth train or test pipeline.

    Args:
        files: (image path, depth path or None) pairs; None gives an all-zero (no GT) depth.
        data: the ``data`` config section (``data.depth`` and the pipeline settings).
        train: training pipeline (:func:`depth_train_transform`) if True, else the test one.
        seed: run seed; with an int item the augmentation RNG is ``default_rng([seed, index])``.
        name: dataset name for messages.
        depth_scale: stored PNG value per metre.
        sunrgbd: depth PNGs use SUN RGB-D's bit rotation.
        skipped: list entries left out because their depth was ``None`` (for the repr).

    Items are an int index or ``(index, seed)`` (RNG ``default_rng(seed)``). A sample is a dict:
    ``image`` float32 3 x H x W (normalised), ``label`` float32 H x W depth in metres (0 = no
    GT; not clipped to ``max_depth``), ``meta`` with ``path``, ``ori_size`` (h, w) of the
    loaded depth (after the KB crop; at test time the label's size), ``img_size`` (h, w) of
    the returned image, ``index`` and ``ignore_index`` (0, so :func:`collate` pads depth with
    0). ``num_classes`` is 1, ``class_names`` ``["depth"]``, ``ignore_index`` 0.
    """

    def __init__(self, files, data: DataConfig, train: bool, seed: int = 0,
                 name: str = "depth", depth_scale: float = 1000.0, sunrgbd: bool = False,
                 skipped: int = 0):
        super().__init__(files, DEPTH_CLASS_NAMES, DEPTH_PALETTE, None, data, train, seed, name)
        self.ignore_index = 0
        self.depth_scale = float(depth_scale)
        self.sunrgbd = sunrgbd
        self.skipped = skipped

    def __repr__(self) -> str:
        mode = "train" if self.train else "test"
        skipped = f", {self.skipped} entries without depth skipped" if self.skipped else ""
        return (f"{type(self).__name__}({self.name}, {len(self)} images{skipped}, depth scale "
                f"{self.depth_scale:g}, {mode} pipeline)")

    def _kb_crop(self, img: np.ndarray, depth: np.ndarray, path: str
                 ) -> tuple[np.ndarray, np.ndarray]:
        if not self.data.depth.kb_crop:
            return img, depth
        try:
            return kb_crop(img, depth, KB_CROP_SIZE)
        except ValueError as e:
            raise DataError(f"{path}: {e} (data.depth.kb_crop)") from None

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        """The untransformed sample: (uint8 RGB H x W x 3, float32 depth H x W in metres, path),
        after the KB crop when ``data.depth.kb_crop``.

        Raises:
            DataError: unreadable image/depth, size mismatch, image smaller than the KB crop.
        """
        img_path, depth_path = self.files[index]
        img = read_image(img_path)
        if depth_path is None:
            depth = np.zeros(img.shape[:2], np.float32)
        else:
            depth = read_depth(depth_path, self.depth_scale, self.sunrgbd)
            check_same_size(img_path, img.shape[:2], depth_path, depth.shape)
        img, depth = self._kb_crop(img, depth, str(img_path))
        return img, depth, str(img_path)

    def train_transform(self, img: np.ndarray, depth: np.ndarray, rng: np.random.Generator
                        ) -> tuple[np.ndarray, np.ndarray]:
        return depth_train_transform(img, depth, self.data, rng)


# --------------------------------------------------------------------------------------------
# layouts


@dataclass
class DepthLayout:
    """The files of one split of a depth dataset folder, and the problems found."""

    files: list[tuple[Path, Path]] = field(default_factory=list)
    """(image, depth) pairs, sorted by image path."""
    problems: list[str] = field(default_factory=list)
    skipped: int = 0
    """List entries whose depth is ``None``."""
    list_file: Path | None = None
    orphan_depths: list[Path] = field(default_factory=list)
    """folder: depth maps without an image."""


def list_file_for(fmt: str, root: Path, split: str) -> Path:
    """The list file of ``split`` (see the module docstring for the naming rule).

    Raises:
        DataError: sunrgbd ``train`` (evaluation-only dataset), or an unknown format.
    """
    if split.endswith(".txt"):
        return root / split
    if fmt == "sunrgbd":
        if split in ("val", "test"):
            return root / "SUNRGBD_val_splits.txt"
        raise DataError(f"{root}: sunrgbd is for evaluation only; its splits are val and test "
                        f"(got {split!r})")
    prefix = {"kitti": "kitti_eigen_", "nyu": "nyu_"}.get(fmt)
    if prefix is None:
        raise DataError(f"depth format {fmt!r} has no list files")
    return root / f"{prefix}{split}.txt"


def _strip(p: str) -> str:
    return p[1:] if p[:1] in ("/", "\\") else p


def _scan_list(fmt: str, root: Path, split: str, out: DepthLayout) -> None:
    lst = list_file_for(fmt, root, split)
    out.list_file = lst
    if not lst.is_file():
        out.problems.append(f"{lst}: split list not found (copy it from the DepthFormer "
                            "toolbox's splits/ folder)")
        return
    img_dir, dep_dir = (root / "input", root / "gt_depth") if fmt == "kitti" else (root, root)
    files = []
    for lineno, line in enumerate(read_text(lst, error=DataError).splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            out.problems.append(f"{lst}:{lineno}: expected '<image> <depth or None> [focal]'")
            continue
        if parts[1] == "None":
            out.skipped += 1
            continue
        img, dep = img_dir / _strip(parts[0]), dep_dir / _strip(parts[1])
        if not img.is_file():
            out.problems.append(f"{lst}:{lineno}: image {img} not found")
        elif not dep.is_file():
            out.problems.append(f"{img}: no depth map ({dep} not found)")
        else:
            files.append((img, dep))
    out.files = sorted(files, key=lambda f: str(f[0]))


def _scan_folder(root: Path, split: str, out: DepthLayout) -> None:
    out.files, out.orphan_depths = pair_folder(root, split, "depth", DEPTH_EXTENSIONS,
                                               "depth map", out.problems)


def scan_depth(fmt: str, root: str | os.PathLike, split: str) -> DepthLayout:
    """List the (image, depth) pairs of ``split`` of a depth dataset and the problems found.

    Args:
        fmt: kitti | nyu | sunrgbd | folder (layouts: the module docstring).
        root: the dataset folder.
        split: split name (list-file rule in the module docstring; folder: any split file name
            or train/val/test/all).

    Raises:
        DataError: sunrgbd ``train``, or an unknown format.
    """
    root = Path(root).expanduser()
    if fmt not in DEPTH_FORMATS:
        raise DataError(f"unknown depth dataset format {fmt!r} (choose from "
                        f"{', '.join(DEPTH_FORMATS)})")
    out = DepthLayout()
    if not root.is_dir():
        out.problems.append(f"{root}: dataset folder not found")
        return out
    if fmt == "folder":
        _scan_folder(root, split, out)
    else:
        _scan_list(fmt, root, split, out)
    if not out.files and not out.problems:
        out.problems.append(f"{out.list_file or root}: no images in split {split!r}")
    return out


def depth_scale_for(fmt: str, depth_scale: float | None, max_depth: float | None = None) -> float:
    """``data.depth.depth_scale``, else the dataset's own (KITTI 256, NYU and SUN RGB-D 1000;
    generated scenes: 1000 when ``max_depth`` x 1000 fits in 16 bits, else 256).

    Raises:
        ConfigError: a folder dataset without ``data.depth.depth_scale``.
    """
    if depth_scale is not None:
        return float(depth_scale)
    if fmt == "generated" and max_depth is not None:
        return 1000.0 if max_depth * 1000.0 <= 65535 else 256.0
    if fmt not in DEFAULT_DEPTH_SCALE:
        raise ConfigError(f"data.depth.depth_scale must be set for a {fmt} depth dataset (the "
                          "PNG value per metre, e.g. 1000 for millimetres, 256 as KITTI)")
    return DEFAULT_DEPTH_SCALE[fmt]
