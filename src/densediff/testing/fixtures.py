"""Writers of tiny datasets in each real on-disk layout: for tests and fixtures only (the test
suite, benchmarks that need a tiny dataset on disk); nothing in the runtime package imports it.

Images and labels are procedural scenes (:func:`densediff.data.worlds.shapes.render_scene`) with
the six scene classes mapped onto real class values of each dataset, and a one-pixel border of
the dataset's "unlabelled" value (CamVid void 11, ADE20K 0, Cityscapes 255, folder 255), so
label mappings and ignore handling are exercised. Everything is deterministic by ``seed``.

The depth writers (``write_kitti``, ``write_nyu``, ``write_sunrgbd``, ``write_depth_folder``)
store rendered rooms (:func:`densediff.data.worlds.rooms.render_depth_scene`) with exact depth,
quantised by each dataset's PNG scale; :func:`depth_scene` gives back what they stored.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from densediff.data.classes import CITYSCAPES_ID_TO_TRAINID
from densediff.data.depth import encode_depth
from densediff.data.io import write_image
from densediff.data.worlds.rooms import render_depth_scene
from densediff.data.worlds.shapes import GENERATED_CLASSES, GENERATED_PALETTE, render_scene

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


FOLDER_IGNORE_COLOUR = (0, 0, 0)
"""The ``[ignore]`` colour of :func:`write_folder`'s colour-coded masks."""


def write_folder(root: str | os.PathLike, n: int = 10, splits: bool = False,
                 seed: int = 0, colour_masks: bool = False) -> Path:
    """Folder layout: ``images/`` (JPEG and PNG, two sizes, one in a subfolder), ``masks/``,
    ``classes.txt`` and, with ``splits``, ``splits/{train,val,test}.txt``; returns ``root``.
    ``colour_masks``: RGB masks in the classes' colours (unlabelled pixels
    :data:`FOLDER_IGNORE_COLOUR`, an ``[ignore]`` line) instead of class ids."""
    root = Path(root)
    stems = []
    colours = np.asarray(list(GENERATED_PALETTE) + [FOLDER_IGNORE_COLOUR] * (256 - len(
        GENERATED_PALETTE)), np.uint8)
    for i, stem, size, ext in _folder_items(n):
        img, label = _scene(seed, 0, i, size, range(len(GENERATED_CLASSES)), void=255)
        write_image(root / "images" / f"{stem}{ext}", img)
        write_image(root / "masks" / f"{stem}.png", colours[label] if colour_masks else label)
        stems.append(stem)
    lines = ["# name R G B (line i = class id i)"]
    lines += [f"{c} {r} {g} {b}" for c, (r, g, b) in zip(GENERATED_CLASSES, GENERATED_PALETTE)]
    if colour_masks:
        lines.append("[ignore] {} {} {}".format(*FOLDER_IGNORE_COLOUR))
    (root / "classes.txt").write_text("\n".join(lines) + "\n")
    if splits:
        _write_folder_splits(root, stems)
    return root


def write_random_image(folder: str | os.PathLike, name: str = "a.png",
                       size: tuple[int, int] = (30, 41), seed: int = 0) -> Path:
    """``folder`` (made) holding one RGB image ``name`` of uniform random pixels, ``size``
    (h, w): an input of odd size for ``predict``; returns ``folder``."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / name)
    return folder


# --------------------------------------------------------------------------------------------
# depth layouts (scenes from densediff.data.worlds.rooms.render_depth_scene)

KITTI_DATE = "2011_09_26"
KITTI_DRIVES = {"train": f"{KITTI_DATE}_drive_0001_sync", "test": f"{KITTI_DATE}_drive_0002_sync"}
NYU_SCENES = {"train": ("kitchen_0028a", "living_room_0019"), "test": ("bathroom", "bedroom")}


def depth_scene(seed: int, split: int, index: int, size: tuple[int, int], max_depth: float,
                density: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The (uint8 RGB, float32 metres) scene the depth writers store for (seed, split, index)."""
    return render_depth_scene(np.random.default_rng([seed, 100 + split, index]), size, max_depth,
                              density)


def _write_depth_png(path: Path, depth: np.ndarray, scale: float, sunrgbd: bool = False) -> None:
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


# --------------------------------------------------------------------------------------------
# nuScenes (densediff.data.nuscenes): tables, camera/LiDAR files, map expansion, split lists

NUSCENES_RIGS = {  # channel: (yaw of the optical axis in degrees, translation, focal at 1600 px)
    "CAM_FRONT_LEFT": (55.0, (1.52, 0.49, 1.51), 1257.9),
    "CAM_FRONT": (0.0, (1.70, 0.02, 1.51), 1266.4),
    "CAM_FRONT_RIGHT": (-55.0, (1.55, -0.49, 1.50), 1260.5),
    "CAM_BACK_LEFT": (110.0, (1.04, 0.48, 1.56), 1256.7),
    "CAM_BACK": (180.0, (0.03, 0.00, 1.57), 809.2),
    "CAM_BACK_RIGHT": (-110.0, (1.03, -0.48, 1.56), 1259.5),
}
"""nuScenes-like camera rigs (the real ones are within a few degrees and centimetres)."""
NUSCENES_CAMERA_COLOURS = {"CAM_FRONT_LEFT": (200, 40, 40), "CAM_FRONT": (40, 200, 40),
                           "CAM_FRONT_RIGHT": (40, 40, 200), "CAM_BACK_LEFT": (200, 200, 40),
                           "CAM_BACK": (200, 40, 200), "CAM_BACK_RIGHT": (40, 200, 200)}
"""Uniform colour of each camera's key-frame images (non-key frames are grey)."""
NUSCENES_LIDAR = (-90.0, (0.94, 0.0, 1.84))
"""LIDAR_TOP yaw (degrees; sensor x points right of the car, y forward) and translation."""
NUSCENES_LOCATIONS = ("boston-seaport", "singapore-onenorth")
NUSCENES_MAP_SHAPES = {
    "drivable_area": [[((7, -3), (13, -3), (13, 3), (7, 3)), ((9, -1), (11, -1), (11, 1), (9, 1))],
                      [((70, 0), (75, 0), (75, 5), (70, 5))],
                      [((95, 0), (100, 0), (100, 5), (95, 5))]],
    "ped_crossing": [[((-12, 8), (-8, 8), (-8, 12), (-12, 12))]],
    "walkway": [[((20, 20), (24, 20), (24, 24), (20, 24))]],
    "stop_line": [[((-2, -22), (2, -22), (2, -18), (-2, -18))]],
    "carpark_area": [[((-30, -4), (-24, -4), (-24, 4), (-30, 4))]],
    "lane": [[((-5, -45), (5, -45), (5, -40), (-5, -40))]],
    "road_divider": [((-20, 5), (20, 5))],
    "lane_divider": [((-20, -5), (0, -5), (20, -5))],
    "traffic_light": [((30, 0), (30, 1))],
}
"""Map shapes written around the first ego pose of every scene, in that ego frame (x forward,
y left; metres): polygon layers list [exterior, hole, ...], line layers a polyline. The first
two drivable-area polygons are one record (``polygon_tokens``), the third (95 m ahead, beyond
the selection square of a 100 m grid) another."""
NUSCENES_POINT_MARKER = (0.0, 10.0, 0.0)
"""Written as the first point of every LiDAR file (sensor frame: 10 m ahead of the car)."""
NUSCENES_CLOSE_POINTS = ((0.3, -0.5, -1.5), (-0.8, 0.2, -1.7))
"""Written next in every LiDAR file: within 1 m of the sensor (removed from sweeps)."""
NUSCENES_CAR = ((15.0, 5.0, 0.9), (1.9, 4.6, 1.7))
"""The annotated car of every scene: centre (ego frame of the scene's first sample; parked,
facing the same way) and size (width, length, height), metres."""
NUSCENES_CATEGORIES = (("vehicle.car", 17), ("human.pedestrian.adult", 2),
                       ("movable_object.barrier", 9))
"""(name, index) of the ``category`` rows (real names and lidarseg indices)."""
NUSCENES_ATTRIBUTES = ("vehicle.moving", "vehicle.parked", "vehicle.stopped")
NUSCENES_VISIBILITY = (("1", "v0-40"), ("2", "v40-60"), ("3", "v60-80"), ("4", "v80-100"))


def _nusc_token(seed: int, *parts) -> str:
    import hashlib

    return hashlib.md5("/".join(map(str, (seed, *parts))).encode()).hexdigest()


def _quat_mul(a, b) -> tuple[float, float, float, float]:
    """Hamilton product of quaternions (w, x, y, z)."""
    aw, ax, ay, az = a
    bw, bx, by, bz = b
    return (aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw)


def _quat_yaw(deg: float) -> tuple[float, float, float, float]:
    h = np.radians(deg) / 2
    return (float(np.cos(h)), 0.0, 0.0, float(np.sin(h)))


def _rot_z(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def write_nuscenes(root: str | os.PathLike, scenes: int = 2, samples_per_scene: int = 3,
                   sweeps_per_sample: int = 2, image_size: tuple[int, int] = (90, 160),
                   version: str = "v1.0-mini", seed: int = 0) -> dict:
    """A tiny nuScenes in the real on-disk format (:mod:`densediff.data.nuscenes`), complete
    enough for nuscenes-devkit (``NuScenes``, ``NuScenesMap`` and its ``get_map_mask``,
    ``LidarPointCloud.from_file_multisweep``; ``tests/test_nuscenes_devkit.py``).

    Writes the 13 tables ``<version>/{scene,sample,sample_data,calibrated_sensor,sensor,
    ego_pose,log,category,attribute,visibility,instance,sample_annotation,map}.json`` (sample
    and sample_data rows shuffled; one annotated parked car per scene, :data:`NUSCENES_CAR`;
    a ``map`` row per location with its ``log_tokens`` and a small semantic-prior PNG under
    ``maps/``), the six cameras (:data:`NUSCENES_RIGS`; camera
    frame x right, y down, z forward; intrinsics scaled to ``image_size`` (h, w)) with one
    uniformly coloured key-frame JPEG per sample under ``samples/CAM_*/`` and one grey non-key
    frame under ``sweeps/CAM_*/`` with the same ``sample_token``, LIDAR_TOP (:data:`NUSCENES_LIDAR`)
    key frames under ``samples/LIDAR_TOP/`` and ``sweeps_per_sample`` sweeps before each under
    ``sweeps/LIDAR_TOP/`` (``prev`` chains run through every frame back to the scene start),
    ``maps/expansion/<location>.json`` (v1.3, every layer and field the devkit reads) for two
    locations and ``splits/train.txt``
    (even scenes plus ``scene-9999``, which is not in the tables) and ``splits/val.txt`` (odd
    scenes).

    Poses: scene ``s`` lies at location ``s % 2``; its sample ``j`` has ego yaw
    ``90 - 120 s + 35 j`` degrees (sample 0 of scene 0: 90, facing global +y). Sweep ``k`` of a
    sample has the sample's yaw, ``k * sweep_dt_us`` earlier, ``k * speed * sweep_dt_us / 1e6``
    metres behind along the heading. Camera heights grow by 1 cm per scene (a calibrated_sensor
    row per scene and sensor). Every LiDAR file holds :data:`NUSCENES_POINT_MARKER`, then
    :data:`NUSCENES_CLOSE_POINTS`, then ``random_points`` points 3..40 m from the sensor.
    The map of a location holds :data:`NUSCENES_MAP_SHAPES` around sample 0 of each of its
    scenes.

    Returns a dict: ``root``, ``version``, ``image_size``, ``cameras``, ``scenes`` (per scene:
    ``name``, ``token``, ``location``, ``samples`` (tokens by time)), ``samples`` ({token:
    ``scene``, ``index``, ``timestamp``, ``translation`` (x, y), ``yaw`` (degrees), ``lidar``
    (key-frame sample_data token), ``camera_files`` {channel: path relative to root},
    ``lidar_file``, ``sweep_files`` (newest first)}), ``cam2ego`` ({scene index: {channel:
    4 x 4}}), ``intrinsics`` ({channel: 3 x 3}), ``lidar2ego`` (4 x 4), ``sweep_dt_us``,
    ``speed``, ``random_points``, ``splits`` ({split: scene names}), ``locations``.
    """
    nusc = _NuScenesWriter(Path(root), image_size, sweeps_per_sample, version, seed)
    for s in range(scenes):
        nusc.scene(s, samples_per_scene)
    return nusc.finish()


_NUSC_TABLES = ("scene", "sample", "sample_data", "calibrated_sensor", "sensor", "ego_pose", "log",
                "category", "attribute", "visibility", "instance", "sample_annotation", "map")
_NUSC_CAMERA_Q = (0.5, -0.5, 0.5, -0.5)
"""A forward camera's rotation, (x right, y down, z forward) -> ego (x forward, y left)."""
_NUSC_CAMERA_R = np.array([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]])
"""The same rotation as a matrix."""


def _nusc_fixed_tables(tok) -> dict[str, list]:
    """The 13 tables, the ones that do not depend on the scenes filled in (category, attribute,
    visibility, sensor)."""
    tables = {k: [] for k in _NUSC_TABLES}
    for name, index in NUSCENES_CATEGORIES:
        tables["category"].append({"token": tok("category", name), "name": name, "index": index,
                                   "description": f"fixture category {name}"})
    for name in NUSCENES_ATTRIBUTES:
        tables["attribute"].append({"token": tok("attribute", name), "name": name,
                                    "description": f"fixture attribute {name}"})
    for token, level in NUSCENES_VISIBILITY:
        tables["visibility"].append({"token": token, "level": level,
                                     "description": f"visibility of whole object is {level}"})
    for ch in [*NUSCENES_RIGS, "LIDAR_TOP"]:
        tables["sensor"].append({"token": tok("sensor", ch), "channel": ch,
                                 "modality": "lidar" if ch == "LIDAR_TOP" else "camera"})
    return tables


def _nusc_intrinsics(h: int, w: int) -> dict[str, np.ndarray]:
    """Each camera's 3 x 3 intrinsics, scaled from 1600 x 900 to ``(h, w)``."""
    intrinsics = {}
    for i, (ch, (_, _, f)) in enumerate(NUSCENES_RIGS.items()):
        sx, sy = w / 1600, h / 900
        intrinsics[ch] = np.array([[f * sx, 0, (800 + 10 * i) * sx],
                                   [0, f * sy, (480 + 5 * i) * sy], [0, 0, 1]])
    return intrinsics


@dataclass
class _NuscScene:
    """One scene being written: index, log file name, token, first ego position, first
    timestamp, sample tokens (by time) and its sample_data rows per channel (by time)."""

    index: int
    logfile: str
    token: str
    base: np.ndarray
    t0: int
    samples: list[str]
    frames: dict[str, list[tuple]]


class _NuScenesWriter:
    """The state of one :func:`write_nuscenes` call: the tables, the map-expansion dicts, the
    returned info, and the random stream of the LiDAR points (drawn in file order)."""

    def __init__(self, root: Path, image_size: tuple[int, int], sweeps_per_sample: int,
                 version: str, seed: int) -> None:
        self.root, self.version, self.sweeps = root, version, sweeps_per_sample
        self.h, self.w = image_size
        self.rng = np.random.default_rng([seed, 7])
        self.tok = lambda *parts: _nusc_token(seed, *parts)
        self.dt = min(50_000, 500_000 // (sweeps_per_sample + 1))
        self.speed, self.n_random = 10.0, 40
        self.tables = _nusc_fixed_tables(self.tok)
        self.out = {"root": root, "version": version, "image_size": (self.h, self.w),
                    "cameras": list(NUSCENES_RIGS), "scenes": [], "samples": {}, "cam2ego": {},
                    "intrinsics": _nusc_intrinsics(self.h, self.w), "sweep_dt_us": self.dt,
                    "speed": self.speed, "random_points": self.n_random,
                    "locations": list(NUSCENES_LOCATIONS)}
        lyaw, lt = NUSCENES_LIDAR
        self.out["lidar2ego"] = np.eye(4)
        self.out["lidar2ego"][:3, :3], self.out["lidar2ego"][:3, 3] = _rot_z(lyaw), lt
        self.maps = {loc: {"node": [], "line": [], "polygon": []} for loc in NUSCENES_LOCATIONS}

    def scene(self, s: int, samples_per_scene: int) -> None:
        """Scene ``s``: its log, calibration, samples, sample_data, map shapes, annotations."""
        tok, loc = self.tok, NUSCENES_LOCATIONS[s % 2]
        logfile = f"n{8 + s:03d}-2018-08-0{1 + s % 9}-15-16-36-0400"
        base = np.array([600.0, 1600.0] if s % 2 == 0 else [400.0, 1100.0]) + [150.0 * (s // 2), 0]
        sc = _NuscScene(index=s, logfile=logfile, token=tok("scene", s), base=base,
                        t0=1532402927_000_000 + s * 100_000_000,
                        samples=[tok("sample", s, j) for j in range(samples_per_scene)],
                        frames={ch: [] for ch in [*NUSCENES_RIGS, "LIDAR_TOP"]})
        self.tables["log"].append({"token": tok("log", s), "logfile": logfile,
                                   "vehicle": logfile[:4], "date_captured": "2018-08-01",
                                   "location": loc})
        cs = self.calibrate(s)
        for j in range(samples_per_scene):
            self.sample(sc, j)
        self.sample_data(sc, cs)
        name = f"scene-{s + 1:04d}"
        self.tables["scene"].append({
            "token": sc.token, "log_token": tok("log", s), "nbr_samples": samples_per_scene,
            "first_sample_token": sc.samples[0], "last_sample_token": sc.samples[-1],
            "name": name, "description": f"fixture scene {s}"})
        self.out["scenes"].append({"name": name, "token": sc.token, "location": loc,
                                   "samples": sc.samples})
        _nusc_map_shapes(self.maps[loc], tok, s, sc.base, 90.0 - 120.0 * s)
        _nusc_annotations(self.tables, tok, s, sc.samples, sc.base, 90.0 - 120.0 * s)

    def calibrate(self, s: int) -> dict[str, str]:
        """The calibrated_sensor rows of scene ``s`` (camera heights + 1 cm per scene) and its
        ``cam2ego`` matrices; returns their tokens by channel."""
        cs, self.out["cam2ego"][s] = {}, {}
        for ch, (yaw, trans, _) in NUSCENES_RIGS.items():
            trans = (trans[0], trans[1], trans[2] + 0.01 * s)
            cs[ch] = self.tok("calibrated_sensor", s, ch)
            self.tables["calibrated_sensor"].append({
                "token": cs[ch], "sensor_token": self.tok("sensor", ch), "translation": list(trans),
                "rotation": list(_quat_mul(_quat_yaw(yaw), _NUSC_CAMERA_Q)),
                "camera_intrinsic": self.out["intrinsics"][ch].tolist()})
            m = np.eye(4)
            m[:3, :3], m[:3, 3] = _rot_z(yaw) @ _NUSC_CAMERA_R, trans
            self.out["cam2ego"][s][ch] = m
        lyaw, lt = NUSCENES_LIDAR
        cs["LIDAR_TOP"] = self.tok("calibrated_sensor", s, "LIDAR_TOP")
        self.tables["calibrated_sensor"].append({
            "token": cs["LIDAR_TOP"], "sensor_token": self.tok("sensor", "LIDAR_TOP"),
            "translation": list(lt), "rotation": list(_quat_yaw(lyaw)), "camera_intrinsic": []})
        return cs

    def sample(self, sc: _NuscScene, j: int) -> None:
        """Sample ``j`` of a scene: its row, its LiDAR and camera frames (images written)."""
        s, st = sc.index, sc.samples[j]
        yaw = 90.0 - 120.0 * s + 35.0 * j
        xy = sc.base + [4.0 * j, 3.0 * j]
        head = np.array([np.cos(np.radians(yaw)), np.sin(np.radians(yaw))])
        ts = sc.t0 + j * 500_000
        self.tables["sample"].append({"token": st, "timestamp": ts, "scene_token": sc.token,
                                      "prev": sc.samples[j - 1] if j else "",
                                      "next": sc.samples[j + 1] if j + 1 < len(sc.samples) else ""})
        info = {"scene": s, "index": j, "timestamp": ts, "translation": tuple(xy), "yaw": yaw,
                "camera_files": {}, "sweep_files": []}
        self.lidar_frames(sc, j, info, xy, head)
        self.camera_frames(sc, j, info, xy, head)
        self.out["samples"][st] = info

    def lidar_frames(self, sc: _NuscScene, j: int, info: dict, xy, head) -> None:
        """The LiDAR sweeps of sample ``j`` (oldest first, ``dt`` apart, behind along
        ``head``), then its key frame."""
        s, st, ts, yaw = sc.index, sc.samples[j], info["timestamp"], info["yaw"]
        for k in range(self.sweeps, 0, -1):
            sts = ts - k * self.dt
            name = f"sweeps/LIDAR_TOP/{sc.logfile}__LIDAR_TOP__{sts}.pcd.bin"
            sd = self.tok("sample_data", s, j, "LIDAR_TOP", k)
            pose = self.ego_pose(sd, sts, xy - k * self.speed * self.dt / 1e6 * head, yaw)
            sc.frames["LIDAR_TOP"].append((sd, st, pose, sts, False, name, 0, 0))
            info["sweep_files"].insert(0, name)
        name = f"samples/LIDAR_TOP/{sc.logfile}__LIDAR_TOP__{ts}.pcd.bin"
        info["lidar"] = sd = self.tok("sample_data", s, j, "LIDAR_TOP")
        info["lidar_file"] = name
        sc.frames["LIDAR_TOP"].append((sd, st, self.ego_pose(sd, ts, xy, yaw), ts, True, name, 0, 0))

    def camera_frames(self, sc: _NuscScene, j: int, info: dict, xy, head) -> None:
        """Each camera's key frame (its colour) and non-key frame (grey, 250 ms later) of
        sample ``j``, images written."""
        s, st, ts, yaw = sc.index, sc.samples[j], info["timestamp"], info["yaw"]
        h, w = self.h, self.w
        for i, ch in enumerate(NUSCENES_RIGS):
            for key in (True, False):
                cts = ts + (10_000 * (i - 2) if key else 250_000)
                folder = "samples" if key else "sweeps"
                name = f"{folder}/{ch}/{sc.logfile}__{ch}__{cts}.jpg"
                sd = self.tok("sample_data", s, j, ch, key)
                pose = self.ego_pose(sd, cts, xy + self.speed * (cts - ts) / 1e6 * head, yaw)
                sc.frames[ch].append((sd, st, pose, cts, key, name, h, w))
                colour = NUSCENES_CAMERA_COLOURS[ch] if key else (128, 128, 128)
                write_image(self.root / name, np.full((h, w, 3), colour, np.uint8))
                if key:
                    info["camera_files"][ch] = name

    def sample_data(self, sc: _NuscScene, cs: dict[str, str]) -> None:
        """The sample_data rows of a scene, ``prev``/``next`` chained per channel, and its
        LiDAR files (in that order: the points are drawn from one stream)."""
        for ch, rows in sc.frames.items():
            for n, (sd, st, pose, ts, key, name, fh, fw) in enumerate(rows):
                self.tables["sample_data"].append({
                    "token": sd, "sample_token": st, "ego_pose_token": pose,
                    "calibrated_sensor_token": cs[ch], "timestamp": ts,
                    "fileformat": "pcd" if ch == "LIDAR_TOP" else "jpg", "is_key_frame": key,
                    "height": fh, "width": fw, "filename": name,
                    "prev": rows[n - 1][0] if n else "",
                    "next": rows[n + 1][0] if n + 1 < len(rows) else ""})
                if ch == "LIDAR_TOP":
                    self.points_file(self.root / name)

    def ego_pose(self, name: str, ts: int, xy, yaw: float) -> str:
        t = self.tok("ego_pose", name)
        self.tables["ego_pose"].append({"token": t, "timestamp": ts, "rotation": list(_quat_yaw(yaw)),
                                        "translation": [float(xy[0]), float(xy[1]), 0.0]})
        return t

    def points_file(self, path: Path) -> None:
        n_random, rng = self.n_random, self.rng
        pts = np.zeros((1 + len(NUSCENES_CLOSE_POINTS) + n_random, 5), np.float32)
        pts[0, :3], pts[0, 3], pts[0, 4] = NUSCENES_POINT_MARKER, 255, 7
        pts[1:3, :3] = NUSCENES_CLOSE_POINTS
        r, a = rng.uniform(3, 40, n_random), rng.uniform(-np.pi, np.pi, n_random)
        pts[3:, 0], pts[3:, 1], pts[3:, 2] = r * np.cos(a), r * np.sin(a), rng.uniform(-2, 2, n_random)
        pts[3:, 3], pts[3:, 4] = rng.uniform(0, 100, n_random), rng.integers(0, 32, n_random)
        path.parent.mkdir(parents=True, exist_ok=True)
        pts.tofile(path)

    def finish(self) -> dict:
        """Shuffle the sample and sample_data rows; write the maps, the tables and the split
        lists; return the info."""
        root, tables, tok = self.root, self.tables, self.tok
        for name in ("sample", "sample_data"):
            tables[name] = [tables[name][i] for i in self.rng.permutation(len(tables[name]))]
        for loc, m in self.maps.items():
            path = root / "maps" / "expansion" / f"{loc}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(m))
            png = f"maps/{tok('map', loc)}.png"  # the semantic prior (real ones: 10 px/m, whole map)
            write_image(root / png, np.zeros((30, 30), np.uint8))
            tables["map"].append({"token": tok("map", loc), "category": "semantic_prior", "filename": png,
                                  "log_tokens": [r["token"] for r in tables["log"]
                                                 if r["location"] == loc]})
        (root / self.version).mkdir(parents=True, exist_ok=True)
        for name, rows in tables.items():
            (root / self.version / f"{name}.json").write_text(json.dumps(rows, indent=0))
        names = [sc["name"] for sc in self.out["scenes"]]
        self.out["splits"] = {"train": names[0::2] + ["scene-9999"], "val": names[1::2]}
        (root / "splits").mkdir(parents=True, exist_ok=True)
        for split, lst in self.out["splits"].items():
            (root / "splits" / f"{split}.txt").write_text("\n".join(lst) + "\n")
        return self.out


def _nusc_map_shapes(m: dict, tok, scene: int, xy: np.ndarray, yaw: float) -> None:
    """Add :data:`NUSCENES_MAP_SHAPES` placed at the ego pose (``xy``, ``yaw`` degrees) to a
    map-expansion dict (made complete with the layers this fixture leaves empty), with the
    fields of the real v1.3 records (references this fixture has no record for are ``""``):
    the stop line is a ``PED_CROSSING`` one (cue: the scene's crossing), the lane has its
    divider segments (its left and right edge nodes), a straight ``arcline_path_3`` and empty
    ``connectivity``, the lane divider its ``lane_divider_segments``."""
    rot = _rot_z(yaw)[:2, :2]
    to_global = lambda p: rot @ np.asarray(p, np.float64) + xy

    def nodes(pts, *key) -> list[str]:
        out = []
        for n, p in enumerate(pts):
            g = to_global(p)
            out.append(tok("node", scene, *key, n))
            m["node"].append({"token": out[-1], "x": float(g[0]), "y": float(g[1])})
        return out

    _nusc_map_layers(m)
    crossing = tok("ped_crossing", scene, 0)
    for layer, shapes in NUSCENES_MAP_SHAPES.items():
        for i, shape in enumerate(shapes):
            t = tok(layer, scene, i)
            if layer in ("road_divider", "lane_divider", "traffic_light"):
                node_tokens = nodes(shape, t)
                m[layer].append(_nusc_line(m, tok, layer, t, node_tokens, to_global(shape[0]), yaw))
                continue
            ext, *holes = shape
            ext_tokens = nodes(ext, t)
            m["polygon"].append({"token": tok("polygon", t), "exterior_node_tokens": ext_tokens,
                                 "holes": [{"node_tokens": nodes(hl, t, "hole", k)}
                                           for k, hl in enumerate(holes)]})
            if layer == "drivable_area":
                if i == 1:  # the second drivable polygon joins the first record
                    m[layer][-1]["polygon_tokens"].append(tok("polygon", t))
                else:
                    m[layer].append({"token": t, "polygon_tokens": [tok("polygon", t)]})
                continue
            m[layer].append(_nusc_polygon_record(m, tok, layer, t, ext, ext_tokens, crossing,
                                                 to_global, yaw))


def _nusc_map_layers(m: dict) -> None:
    """Make a map-expansion dict complete: every layer this fixture leaves empty, the version,
    the canvas, the lane paths and connectivity."""
    for layer in ("drivable_area", "road_segment", "road_block", "lane", "ped_crossing", "walkway",
                  "stop_line", "carpark_area", "road_divider", "lane_divider", "traffic_light",
                  "lane_connector"):
        m.setdefault(layer, [])
    m.update(version="1.3", canvas_edge=[3000.0, 3000.0])
    m.setdefault("arcline_path_3", {})
    m.setdefault("connectivity", {})


def _nusc_line(m: dict, tok, layer: str, t: str, node_tokens: list[str], start, yaw: float) -> dict:
    """The ``line`` row of a line layer's shape (added to ``m``) and its layer record, returned
    (``start``: its first point, global)."""
    m["line"].append({"token": tok("line", t), "node_tokens": node_tokens})
    rec = {"token": t, "line_token": tok("line", t)}
    if layer == "road_divider":
        rec["road_segment_token"] = ""
    elif layer == "lane_divider":
        rec["lane_divider_segments"] = [{"node_token": n, "segment_type": "SINGLE_DASHED_WHITE"}
                                        for n in node_tokens]
    else:
        rec.update(traffic_light_type="VERTICAL", from_road_block_token="", items=[],
                   pose={"tx": float(start[0]), "ty": float(start[1]), "tz": 3.0,
                         "rx": 0.0, "ry": 0.0, "rz": float(np.radians(yaw))})
    return rec


def _nusc_polygon_record(m: dict, tok, layer: str, t: str, ext, ext_tokens: list[str],
                         crossing: str, to_global, yaw: float) -> dict:
    """The record of a polygon layer's shape (not a drivable area), with its layer's fields; a
    lane's path and connectivity are added to ``m``."""
    rec = {"token": t, "polygon_token": tok("polygon", t)}
    if layer == "ped_crossing":
        rec["road_segment_token"] = ""
    elif layer == "stop_line":
        rec.update(stop_line_type="PED_CROSSING", ped_crossing_tokens=[crossing],
                   traffic_light_tokens=[], road_block_token="")
    elif layer == "carpark_area":
        rec.update(orientation=float(np.radians(yaw)), road_block_token="")
    elif layer == "lane":  # exterior (x0, y0) (x1, y0) (x1, y1) (x0, y1), heading +x
        rec.update(lane_type="CAR", from_edge_line_token="", to_edge_line_token="",
                   left_lane_divider_segments=[
                       {"node_token": n, "segment_type": "NIL"} for n in ext_tokens[:1:-1]],
                   right_lane_divider_segments=[
                       {"node_token": n, "segment_type": "NIL"} for n in ext_tokens[:2]])
        (x0, y0), (x1, y1) = ext[0], ext[2]
        a, b = to_global((x0, (y0 + y1) / 2)), to_global((x1, (y0 + y1) / 2))
        heading = float(np.radians(yaw))
        m["arcline_path_3"][t] = [{
            "start_pose": [float(a[0]), float(a[1]), heading],
            "end_pose": [float(b[0]), float(b[1]), heading], "shape": "LSR",
            "radius": 999.999, "segment_length": [0.0, float(x1 - x0), 0.0]}]
        m["connectivity"][t] = {"incoming": [], "outgoing": []}
    return rec


def _nusc_annotations(tables: dict, tok, scene: int, sample_tokens: list[str], xy: np.ndarray,
                      yaw: float) -> None:
    """One parked car (:data:`NUSCENES_CAR`, placed at the ego pose ``xy``, ``yaw`` degrees)
    annotated in every sample of a scene: an ``instance`` row and a ``sample_annotation`` chain."""
    (cx, cy, cz), size = NUSCENES_CAR
    g = _rot_z(yaw)[:2, :2] @ np.array([cx, cy]) + xy
    inst = tok("instance", scene)
    anns = [tok("sample_annotation", scene, j) for j in range(len(sample_tokens))]
    tables["instance"].append({"token": inst, "category_token": tok("category", "vehicle.car"),
                               "nbr_annotations": len(anns), "first_annotation_token": anns[0],
                               "last_annotation_token": anns[-1]})
    for j, (ann, st) in enumerate(zip(anns, sample_tokens)):
        tables["sample_annotation"].append({
            "token": ann, "sample_token": st, "instance_token": inst, "visibility_token": "4",
            "attribute_tokens": [tok("attribute", "vehicle.parked")],
            "translation": [float(g[0]), float(g[1]), cz], "size": list(size),
            "rotation": list(_quat_yaw(yaw)), "prev": anns[j - 1] if j else "",
            "next": anns[j + 1] if j + 1 < len(anns) else "", "num_lidar_pts": 0,
            "num_radar_pts": 0})
