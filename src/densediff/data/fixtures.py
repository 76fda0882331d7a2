"""Writers of tiny datasets in each real on-disk layout (for tests and examples).

Images and labels are procedural scenes (:func:`densediff.data.generated.render_scene`) with
the six scene classes mapped onto real class values of each dataset, and a one-pixel border of
the dataset's "unlabelled" value (CamVid void 11, ADE20K 0, Cityscapes 255, folder 255), so
label mappings and ignore handling are exercised. Everything is deterministic by ``seed``.

The depth writers (``write_kitti``, ``write_nyu``, ``write_sunrgbd``, ``write_depth_folder``)
store rendered rooms (:func:`densediff.data.depth_scenes.render_depth_scene`) with exact depth,
quantised by each dataset's PNG scale; :func:`depth_scene` gives back what they stored.
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


def _folder_items(n: int):
    """(index, stem, size, suffix) of the folder fixtures: JPEG and PNG, two sizes, the last
    image in a subfolder."""
    for i in range(n):
        stem = f"extra/img_{i:03d}" if i == n - 1 and n > 1 else f"img_{i:03d}"
        size, ext = ((36, 48), ".jpg") if i % 2 == 0 else ((40, 30), ".png")
        yield i, stem, size, ext


def _write_folder_splits(root: Path, stems: list[str]) -> None:
    """``splits/{train,val,test}.txt``: the first fifth (at least one) is val and test."""
    k = max(1, len(stems) // 5)
    (root / "splits").mkdir(parents=True, exist_ok=True)
    (root / "splits" / "train.txt").write_text("\n".join(stems[k:]) + "\n")
    (root / "splits" / "val.txt").write_text("\n".join(stems[:k]) + "\n")
    (root / "splits" / "test.txt").write_text("\n".join(stems[:k]) + "\n")


def write_folder(root: str | os.PathLike, n: int = 10, splits: bool = False,
                 seed: int = 0) -> Path:
    """Folder layout: ``images/`` (JPEG and PNG, two sizes, one in a subfolder), ``masks/``,
    ``classes.txt`` and, with ``splits``, ``splits/{train,val,test}.txt``; returns ``root``."""
    root = Path(root)
    stems = []
    for i, stem, size, ext in _folder_items(n):
        img, label = _scene(seed, 0, i, size, range(len(GENERATED_CLASSES)), void=255)
        write_image(root / "images" / f"{stem}{ext}", img)
        write_image(root / "masks" / f"{stem}.png", label)
        stems.append(stem)
    lines = ["# name R G B (line i = class id i)"]
    lines += [f"{c} {r} {g} {b}" for c, (r, g, b) in zip(GENERATED_CLASSES, GENERATED_PALETTE)]
    (root / "classes.txt").write_text("\n".join(lines) + "\n")
    if splits:
        _write_folder_splits(root, stems)
    return root


# --------------------------------------------------------------------------------------------
# depth layouts (scenes from densediff.data.depth_scenes.render_depth_scene)

KITTI_DATE = "2011_09_26"
KITTI_DRIVES = {"train": f"{KITTI_DATE}_drive_0001_sync", "test": f"{KITTI_DATE}_drive_0002_sync"}
NYU_SCENES = {"train": ("kitchen_0028a", "living_room_0019"), "test": ("bathroom", "bedroom")}


def depth_scene(seed: int, split: int, index: int, size: tuple[int, int], max_depth: float,
                density: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The (uint8 RGB, float32 metres) scene the depth writers store for (seed, split, index)."""
    from densediff.data.depth_scenes import render_depth_scene

    return render_depth_scene(np.random.default_rng([seed, 100 + split, index]), size, max_depth,
                              density)


def _write_depth_png(path: Path, depth: np.ndarray, scale: float, sunrgbd: bool = False) -> None:
    from densediff.data.depth import encode_depth

    write_image(path, encode_depth(depth, scale, sunrgbd))


def write_kitti(root: str | os.PathLike, n: int = 3, size: tuple[int, int] = (40, 72),
                seed: int = 0, density: float = 0.12) -> Path:
    """KITTI Eigen layout (as the DepthFormer toolbox): ``input/`` images, ``gt_depth/`` sparse
    16-bit depth (value = metres x 256, about ``density`` of the pixels set, max depth 80 m),
    ``kitti_eigen_train.txt`` (drive 0001) and ``kitti_eigen_test.txt`` (drive 0002) with ``n``
    samples each plus one ``None`` line (an image without GT). Split codes: train 0, test 1.
    Returns ``root``."""
    root = Path(root)
    for s, split in enumerate(("train", "test")):
        drive = KITTI_DRIVES[split]
        lines = []
        for i in range(n + 1):
            frame = f"{i:010d}.png"
            img_rel = f"{KITTI_DATE}/{drive}/image_02/data/{frame}"
            dep_rel = f"{drive}/proj_depth/groundtruth/image_02/{frame}"
            img, depth = depth_scene(seed, s, i, size, 80.0, density)
            write_image(root / "input" / img_rel, img)
            if i == n:  # the last frame has no ground truth
                lines.append(f"{img_rel} None 721.5377\n")
                continue
            _write_depth_png(root / "gt_depth" / dep_rel, depth, 256.0)
            lines.append(f"{img_rel} {dep_rel} 721.5377\n")
        (root / f"kitti_eigen_{split}.txt").write_text("".join(lines))
    return root


def write_nyu(root: str | os.PathLike, n: int = 3, size: tuple[int, int] = (48, 64),
              seed: int = 0) -> Path:
    """NYU Depth v2 layout (BTS sync / toolbox): ``<scene>/rgb_<k>.jpg`` and
    ``<scene>/sync_depth_<k>.png`` (dense, value = millimetres, max depth 10 m), lists
    ``nyu_train.txt`` (leading ``/``, as the toolbox) and ``nyu_test.txt`` (test images in
    scene-type folders) with ``n`` samples each. Split codes: train 0, test 1. Returns ``root``."""
    root = Path(root)
    for s, split in enumerate(("train", "test")):
        lines = []
        for i in range(n):
            scene = NYU_SCENES[split][i % 2]
            k = f"{i * 7 + 1:05d}"
            img, depth = depth_scene(seed, s, i, size, 10.0)
            write_image(root / scene / f"rgb_{k}.jpg", img)
            _write_depth_png(root / scene / f"sync_depth_{k}.png", depth, 1000.0)
            lead = "/" if split == "train" else ""
            lines.append(f"{lead}{scene}/rgb_{k}.jpg {lead}{scene}/sync_depth_{k}.png 518.8579\n")
        (root / f"nyu_{split}.txt").write_text("".join(lines))
    return root


def write_sunrgbd(root: str | os.PathLike, n: int = 2, size: tuple[int, int] = (48, 64),
                  seed: int = 0) -> Path:
    """SUN RGB-D layout (toolbox): ``SUNRGBD/kv2/kinect2data/<seq>/image/<id>.jpg`` and
    ``.../depth/<id>.png`` with millimetres rotated left by 3 bits (as the real files), and
    ``SUNRGBD_val_splits.txt``. Split code 0. Returns ``root``."""
    root = Path(root)
    lines = []
    for i in range(n):
        seq = f"SUNRGBD/kv2/kinect2data/{i:06d}_2014-05-26_14-23-37_260595134347_rgbf{i:06d}-resize"
        img, depth = depth_scene(seed, 0, i, size, 8.0)
        write_image(root / seq / "image" / f"{i:07d}.jpg", img)
        _write_depth_png(root / seq / "depth" / f"{i:07d}.png", depth, 1000.0, sunrgbd=True)
        lines.append(f"{seq}/image/{i:07d}.jpg {seq}/depth/{i:07d}.png\n")
    (root / "SUNRGBD_val_splits.txt").write_text("".join(lines))
    return root


def write_depth_folder(root: str | os.PathLike, n: int = 10, splits: bool = False,
                       scale: float = 1000.0, seed: int = 0) -> Path:
    """Depth folder layout: ``images/`` (JPEG and PNG, two sizes, the last in ``extra/``) and
    ``depth/<stem>.png`` (16-bit, value = metres x ``scale``, max depth 10 m) and, with
    ``splits``, ``splits/{train,val,test}.txt``. Split code 0. Returns ``root``."""
    root = Path(root)
    stems = []
    for i, stem, size, ext in _folder_items(n):
        img, depth = depth_scene(seed, 0, i, size, 10.0)
        write_image(root / "images" / f"{stem}{ext}", img)
        _write_depth_png(root / "depth" / f"{stem}.png", depth, scale)
        stems.append(stem)
    if splits:
        _write_folder_splits(root, stems)
    return root
