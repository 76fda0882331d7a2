"""Validate a dataset folder and list every problem found (``densediff data check``).

Segmentation formats: camvid, ade20k, cityscapes, folder. Depth formats
(:mod:`densediff.data.depth`): kitti, nyu, sunrgbd, and ``depth_folder`` (the depth ``folder``
layout: ``images/`` + ``depth/``).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from densediff.data.classes import ColourMap, map_label
from densediff.data.depth import read_depth, scan_depth
from densediff.data.io import check_same_size, image_size, read_image, read_label
from densediff.data.layouts import FORMATS, dataset_dir, scan, splits_of
from densediff.errors import DataError
from densediff.limits import DATA_CHECK_FORMATS

DEPTH_CHECK_FORMATS = ("kitti", "nyu", "sunrgbd", "depth_folder")
CHECK_FORMATS = DATA_CHECK_FORMATS
assert set(CHECK_FORMATS) == {*FORMATS, *DEPTH_CHECK_FORMATS, "nuscenes"}
"""Formats :func:`check_dataset` accepts."""


def _check_files(img: Path, label: Path, read_label_shape, decode_images: bool) -> list[str]:
    """Problems of one image/label pair: the image unreadable or truncated, whatever
    ``read_label_shape(label)`` raises as DataError, and a size mismatch."""
    problems, size, lab_size = [], None, None
    try:
        size = read_image(img).shape[:2] if decode_images else image_size(img)
    except DataError as e:
        problems.append(str(e))
    try:
        lab_size = read_label_shape(label)
    except DataError as e:
        problems.append(str(e))
    if size is not None and lab_size is not None:
        try:
            check_same_size(img, size, label, lab_size)
        except DataError as e:
            problems.append(str(e))
    return problems


def check_pair(img: Path, label: Path, lut: np.ndarray | None,
               decode_images: bool = True, colours: ColourMap | None = None) -> list[str]:
    """Problems of one image/label pair: unreadable or truncated files, a label that is not a
    single-channel image (nor, with ``colours``, a colour-coded mask of known colours),
    invalid label values (skipped when ``lut`` is None), size mismatch."""
    raw = None

    def read(path: Path) -> tuple[int, ...]:
        nonlocal raw
        raw = read_label(path, colours)
        return raw.shape

    problems = _check_files(img, label, read, decode_images)
    if lut is not None and raw is not None:
        try:
            map_label(raw, lut, label)
        except DataError as e:
            problems.append(str(e))
    return problems


def check_depth_pair(img: Path, depth: Path, sunrgbd: bool = False,
                     decode_images: bool = True) -> list[str]:
    """Problems of one image/depth pair: unreadable or truncated files, a depth map that is not
    a single-channel 16/8-bit image, size mismatch."""
    return _check_files(img, depth, lambda p: read_depth(p, 1.0, sunrgbd).shape, decode_images)


def depth_splits_of(fmt: str, root: str | os.PathLike) -> list[str]:
    """The splits :func:`check_dataset` inspects for a depth format: the list files present
    (``kitti_eigen_*.txt``, ``nyu_*.txt``), ``val`` for sunrgbd, the folder's split files (or
    ``all``) for depth_folder."""
    root = Path(root).expanduser()
    if fmt == "depth_folder":
        return splits_of("folder", root)
    if fmt == "sunrgbd":
        return ["val"]
    prefix = {"kitti": "kitti_eigen_", "nyu": "nyu_"}[fmt]
    found = sorted(p.name[len(prefix):-4] for p in root.glob(f"{prefix}*.txt"))
    return found or ["train", "test"]  # none: report the missing lists


def _check_nuscenes(root: Path) -> list[str]:
    """nuScenes: every ``v1.0-*`` table folder, each split (``splits/*.txt``, else train / val
    or mini_train / mini_val from nuscenes-devkit), the six cameras, LIDAR_TOP with 9 sweeps and
    the six map classes (:func:`densediff.data.nuscenes.check_nuscenes`)."""
    from densediff.config import BEV_MAP_CLASSES, NUSCENES_CAMERAS
    from densediff.data.nuscenes import check_nuscenes

    if not root.is_dir():
        return [_not_a_folder(root)]
    versions = sorted(d.name for d in root.glob("v1.0-*") if d.is_dir())
    if not versions:
        return [f"{root}: no v1.0-* table folder (e.g. v1.0-trainval, v1.0-mini)"]
    split_files = sorted(p.stem for p in (root / "splits").glob("*.txt"))
    problems: list[str] = []
    for version in versions:
        splits = split_files or (["mini_train", "mini_val"] if version.endswith("mini")
                                 else ["train", "val"])
        for split in splits:
            problems += check_nuscenes(root, version, split, NUSCENES_CAMERAS, lidar=True,
                                       lidar_sweeps=9, classes=BEV_MAP_CLASSES)
    return list(dict.fromkeys(problems))


def _not_a_folder(root) -> str:
    """Why ``root`` is not a dataset folder: not found, or what it is (a file, a FIFO ...)."""
    from densediff.utils.checks import path_kind

    kind = path_kind(Path(root).expanduser())
    return (f"{root}: dataset folder not found" if kind in ("missing", "a folder")
            else f"{root}: is {kind}, not a dataset folder")


def check_dataset(root: str | os.PathLike, fmt: str, decode_images: bool = True,
                  progress: bool = False, workers: int | None = None) -> list[str]:
    """Check a dataset folder; returns every problem found, one line each naming the file.

    Checks the layout of every split (missing folders, images without labels, labels without
    images, bad split or class files) and every pair: readable (and, with ``decode_images``,
    fully decodable, so truncated files are found) images, single-channel labels with valid
    values for the format, equal image and label sizes. An empty list means all is well.

    Args:
        root: the dataset folder.
        fmt: camvid | ade20k | cityscapes | folder (layouts: :mod:`densediff.data.layouts`),
            or a depth format kitti | nyu | sunrgbd | depth_folder (layouts:
            :mod:`densediff.data.depth`; depth maps are checked to be readable single-channel
            images of the image's size), or nuscenes (:func:`_check_nuscenes`).
        decode_images: decode every image (finds truncated files) instead of reading headers
            only (several times faster on JPEG datasets). Labels are always decoded.
        progress: show a progress bar.
        workers: threads for reading files (default: the number of CPUs, at most 8).
    """
    if fmt not in CHECK_FORMATS:
        raise DataError(f"unknown dataset format {fmt!r} (choose from {', '.join(CHECK_FORMATS)})")
    if fmt == "nuscenes":
        return _check_nuscenes(Path(root).expanduser())
    depth = fmt in DEPTH_CHECK_FORMATS
    if not (Path(root).expanduser() if depth else dataset_dir(fmt, root)).is_dir():
        return [_not_a_folder(root)]
    problems: list[str] = []
    jobs: dict[tuple[Path, Path], tuple] = {}
    if depth:
        scan_fmt = "folder" if fmt == "depth_folder" else fmt
        for split in depth_splits_of(fmt, root):
            dlayout = scan_depth(scan_fmt, root, split)
            problems += dlayout.problems
            problems += [f"{p}: depth map without image" for p in dlayout.orphan_depths]
            for pair in dlayout.files:
                jobs.setdefault(pair, (None, None))
    else:
        for split in splits_of(fmt, root):
            layout = scan(fmt, root, split)
            problems += layout.problems
            problems += [f"{p}: label without image" for p in layout.orphan_labels]
            lut = layout.lut if layout.class_names else None
            for pair in layout.files:
                jobs.setdefault(pair, (lut, layout.colours))

    def run(item):
        (img, lab), (lut, colours) = item
        if depth:
            return check_depth_pair(img, lab, fmt == "sunrgbd", decode_images)
        return check_pair(img, lab, lut, decode_images, colours)

    workers = workers or min(os.cpu_count() or 1, 8)
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(run, jobs.items())
        if progress:
            from tqdm import tqdm
            results = tqdm(results, total=len(jobs), desc=f"checking {fmt}", unit="pair")
        for found in results:
            problems += found
    return list(dict.fromkeys(problems))  # unique, in order
