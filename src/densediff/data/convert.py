"""``densediff data convert-masks``: a folder dataset with colour-coded masks as one with
class-id masks (8-bit PNG), decoded once instead of at every load."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from densediff.data.classes import FOLDER_IGNORE, label_lut, map_label, read_classes
from densediff.data.io import LABEL_EXTENSIONS, read_label, write_image
from densediff.errors import DataError, UserError

__all__ = ["convert_masks"]


def _check_out(root: Path, out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: --out must be a new or empty folder, but this is a file")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out}: --out must be a new or empty folder (it holds files)")
    r, o = os.path.realpath(root), os.path.realpath(out)
    if o == r or os.path.commonpath([o, r]) == r:
        raise UserError(f"{out}: --out must lie outside the dataset folder {root}")


def convert_masks(root: str | os.PathLike, out: str | os.PathLike, progress: bool = False
                  ) -> int:
    """Write the folder dataset ``root`` as ``out``: ``masks/`` as class-id PNGs (colour
    masks mapped through ``classes.txt``, id masks checked and kept), ``classes.txt`` and
    ``splits/`` copied, ``images`` a symbolic link to ``root/images`` (a copy where links
    cannot be made). Every mask is checked (one DataError naming the first bad file) before
    ``out/masks`` appears. Returns the number of masks written."""
    root, out = Path(root).expanduser(), Path(out).expanduser()
    if not root.is_dir():
        raise UserError(f"{root}: dataset folder not found")
    _check_out(root, out)
    classes = read_classes(root / "classes.txt")
    colours = classes.colour_map()
    masks = root / "masks"
    if not masks.is_dir():
        raise DataError(f"{masks}: folder not found (a folder dataset keeps its masks there)")
    files = sorted(p for p in masks.rglob("*") if p.suffix.lower() in LABEL_EXTENSIONS
                   and p.is_file())
    if not files:
        raise DataError(f"{masks}: no masks ({', '.join(LABEL_EXTENSIONS)})")
    targets: dict[Path, Path] = {}
    for f in files:
        rel = f.relative_to(masks).with_suffix(".png")
        if rel in targets:
            raise DataError(f"{f}: has the stem of {targets[rel]}; both would be {rel}")
        targets[rel] = f
    lut = label_lut("folder", len(classes.names), FOLDER_IGNORE)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / ".masks.partial"
    items = targets.items()
    if progress:
        from tqdm import tqdm

        items = tqdm(items, total=len(targets), desc="convert-masks", unit="mask",
                     disable=None)  # on a terminal only
    try:
        for rel, f in items:
            raw = read_label(f, colours)
            map_label(raw, lut, f)  # class ids and 255 only: one DataError naming the file
            write_image(partial / rel, raw.astype(np.uint8))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    os.replace(partial, out / "masks")
    shutil.copy2(root / "classes.txt", out / "classes.txt")
    if (root / "splits").is_dir():
        shutil.copytree(root / "splits", out / "splits")
    images = root / "images"
    if images.is_dir():
        try:
            (out / "images").symlink_to(images.resolve(), target_is_directory=True)
        except OSError:
            shutil.copytree(images, out / "images")
    return len(targets)
