"""Validate a dataset folder and list every problem found (``densediff data check``)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from densediff.data.classes import map_label
from densediff.data.io import check_same_size, image_size, read_image, read_label
from densediff.data.layouts import FORMATS, dataset_dir, scan, splits_of
from densediff.errors import DataError


def check_pair(img: Path, label: Path, lut: np.ndarray | None,
               decode_images: bool = True) -> list[str]:
    """Problems of one image/label pair: unreadable or truncated files, a label that is not a
    single-channel image, invalid label values (skipped when ``lut`` is None), size mismatch."""
    problems, size, lab_size = [], None, None
    try:
        size = read_image(img).shape[:2] if decode_images else image_size(img)
    except DataError as e:
        problems.append(str(e))
    try:
        raw = read_label(label)
        lab_size = raw.shape
        if lut is not None:
            map_label(raw, lut, label)
    except DataError as e:
        problems.append(str(e))
    if size is not None and lab_size is not None:
        try:
            check_same_size(img, size, label, lab_size)
        except DataError as e:
            problems.append(str(e))
    return problems


def check_dataset(root: str | os.PathLike, fmt: str, decode_images: bool = True,
                  progress: bool = False, workers: int | None = None) -> list[str]:
    """Check a dataset folder; returns every problem found, one line each naming the file.

    Checks the layout of every split (missing folders, images without labels, labels without
    images, bad split or class files) and every pair: readable (and, with ``decode_images``,
    fully decodable, so truncated files are found) images, single-channel labels with valid
    values for the format, equal image and label sizes. An empty list means all is well.

    Args:
        root: the dataset folder.
        fmt: camvid | ade20k | cityscapes | folder (layouts: :mod:`densediff.data.layouts`).
        decode_images: decode every image (finds truncated files) instead of reading headers
            only (several times faster on JPEG datasets). Labels are always decoded.
        progress: show a progress bar.
        workers: threads for reading files (default: the number of CPUs, at most 8).
    """
    if fmt not in FORMATS:
        raise DataError(f"unknown dataset format {fmt!r} (choose from {', '.join(FORMATS)})")
    if not dataset_dir(fmt, root).is_dir():
        return [f"{root}: dataset folder not found"]
    problems: list[str] = []
    jobs: dict[tuple[Path, Path], np.ndarray | None] = {}
    for split in splits_of(fmt, root):
        layout = scan(fmt, root, split)
        problems += layout.problems
        problems += [f"{p}: label without image" for p in layout.orphan_labels]
        lut = layout.lut if layout.class_names else None
        for pair in layout.files:
            jobs.setdefault(pair, lut)

    def run(item):
        (img, lab), lut = item
        return check_pair(img, lab, lut, decode_images)

    workers = workers or min(os.cpu_count() or 1, 8)
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(run, jobs.items())
        if progress:
            from tqdm import tqdm
            results = tqdm(results, total=len(jobs), desc=f"checking {fmt}", unit="pair")
        for found in results:
            problems += found
    return list(dict.fromkeys(problems))  # unique, in order
