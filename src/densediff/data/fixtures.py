"""Writers of tiny datasets in each real on-disk layout (for tests and examples).

Images and labels are procedural scenes (:func:`densediff.data.generated.render_scene`) with
the six scene classes mapped onto real class values of each dataset, and a one-pixel border of
the dataset's "unlabelled" value (CamVid void 11, ADE20K 0, Cityscapes 255, folder 255), so
label mappings and ignore handling are exercised. Everything is deterministic by ``seed``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from densediff.data.classes import CITYSCAPES_ID_TO_TRAINID
from densediff.data.generated import GENERATED_CLASSES, GENERATED_PALETTE, render_scene
from densediff.data.io import write_image

# scene classes (sky, ground, disc, square, triangle, ring) -> raw label values of each layout
CAMVID_VALUES = [0, 3, 8, 1, 6, 10]  # Sky Road Car Building SignSymbol Bicyclist
ADE20K_VALUES = [3, 7, 21, 2, 150, 13]  # sky road car building flag person (id + 1)
CITYSCAPES_TRAINIDS = [10, 0, 13, 2, 7, 11]  # sky road car building traffic-sign person


def _scene(seed: int, split: int, index: int, size: tuple[int, int], values, void: int):
    """A scene with its labels mapped to ``values`` and a border of ``void``."""
    img, label = render_scene(np.random.default_rng([seed, split, index]), size)
    label = np.asarray(values, np.uint8)[label]
    label[0, :] = label[:, 0] = void
    return img, label


def write_camvid(root: str | os.PathLike, n: int = 3, size: tuple[int, int] = (36, 48),
                 seed: int = 0) -> Path:
    """CamVid (SegNet) layout with ``n`` images per split; returns ``root``."""
    root = Path(root)
    for s, split in enumerate(("train", "val", "test")):
        lines = []
        for i in range(n):
            name = f"0001TP_{i:06d}.png"
            img, label = _scene(seed, s, i, size, CAMVID_VALUES, void=11)
            write_image(root / split / name, img)
            write_image(root / f"{split}annot" / name, label)
            lines.append(f"/SegNet/CamVid/{split}/{name} /SegNet/CamVid/{split}annot/{name}\n")
        (root / f"{split}.txt").write_text("".join(lines))
    return root


def write_ade20k(root: str | os.PathLike, n: int = 3, size: tuple[int, int] = (36, 48),
                 seed: int = 0) -> Path:
    """ADEChallengeData2016 layout (JPEG images) with ``n`` images per split; returns ``root``."""
    root = Path(root)
    for s, (split, tag) in enumerate((("training", "train"), ("validation", "val"))):
        for i in range(n):
            name = f"ADE_{tag}_{i + 1:08d}"
            img, label = _scene(seed, s, i, size, ADE20K_VALUES, void=0)
            write_image(root / "images" / split / f"{name}.jpg", img)
            write_image(root / "annotations" / split / f"{name}.png", label)
    return root


def write_cityscapes(root: str | os.PathLike, n: int = 2, size: tuple[int, int] = (32, 64),
                     seed: int = 0, train_ids: bool = True) -> Path:
    """Cityscapes layout with ``n`` images per split (train in two cities); returns ``root``.

    Writes ``*_gtFine_labelIds.png`` always and ``*_gtFine_labelTrainIds.png`` when
    ``train_ids``. The test split's labels are all "unlabelled", as in the real release.
    """
    root = Path(root)
    to_id = {t: i for i, t in enumerate(CITYSCAPES_ID_TO_TRAINID) if t != 255}
    to_id[255] = 0
    id_lut = np.zeros(256, np.uint8)
    for t, i in to_id.items():
        id_lut[t] = i
    for s, split in enumerate(("train", "val", "test")):
        for i in range(n):
            city = {"train": ("aachen", "bochum")[i % 2], "val": "frankfurt", "test": "berlin"}[split]
            name = f"{city}_{i:06d}_000019"
            img, label = _scene(seed, s, i, size, CITYSCAPES_TRAINIDS, void=255)
            if split == "test":
                label[:] = 255
            write_image(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", img)
            gt = root / "gtFine" / split / city
            write_image(gt / f"{name}_gtFine_labelIds.png", id_lut[label])
            if train_ids:
                write_image(gt / f"{name}_gtFine_labelTrainIds.png", label)
    return root


def write_folder(root: str | os.PathLike, n: int = 10, splits: bool = False,
                 seed: int = 0) -> Path:
    """Folder layout: ``images/`` (JPEG and PNG, two sizes, one in a subfolder), ``masks/``,
    ``classes.txt`` and, with ``splits``, ``splits/{train,val,test}.txt``; returns ``root``."""
    root = Path(root)
    stems = []
    for i in range(n):
        stem = f"extra/img_{i:03d}" if i == n - 1 and n > 1 else f"img_{i:03d}"
        size, ext = ((36, 48), ".jpg") if i % 2 == 0 else ((40, 30), ".png")
        img, label = _scene(seed, 0, i, size, range(len(GENERATED_CLASSES)), void=255)
        write_image(root / "images" / f"{stem}{ext}", img)
        write_image(root / "masks" / f"{stem}.png", label)
        stems.append(stem)
    lines = ["# name R G B (line i = class id i)"]
    lines += [f"{c} {r} {g} {b}" for c, (r, g, b) in zip(GENERATED_CLASSES, GENERATED_PALETTE)]
    (root / "classes.txt").write_text("\n".join(lines) + "\n")
    if splits:
        k = max(1, n // 5)
        (root / "splits").mkdir(parents=True, exist_ok=True)
        (root / "splits" / "train.txt").write_text("\n".join(stems[k:]) + "\n")
        (root / "splits" / "val.txt").write_text("\n".join(stems[:k]) + "\n")
        (root / "splits" / "test.txt").write_text("\n".join(stems[:k]) + "\n")
    return root
