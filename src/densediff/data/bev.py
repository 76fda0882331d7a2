"""BEV samples: multi-camera images with calibration, LiDAR points and a vector map.

A dataset (nuScenes, :mod:`densediff.data.nuscenes`; the generated world,
:mod:`densediff.data.bev_world`) loads a :class:`BEVRecord` per sample, everything in the
*ego frame* (x forward, y left, z up, metres). :class:`BEVDataset` turns it into tensors:

- each camera image is resized, cropped (and in training flipped and rotated) by one affine
  map ``A`` (BEVFusion ``ImageAug3D``); the intrinsics become ``A @ K``, so a camera point
  projects to the right pixel of the augmented image;
- in training the whole scene is rotated about z, scaled and flipped by a 4 x 4 ``T``
  (BEVFusion ``GlobalRotScaleTrans`` + ``RandomFlip3D``): ``cam2ego <- T @ cam2ego``, points
  ``<- T p`` and the map geometry moves with them;
- the map is rasterised into the output grid (:func:`rasterize_map`), one {0, 1} layer per
  class (multi-label).

A sample is ``{"image": {"images": N x 3 x H x W (normalised), "intrinsics": N x 3 x 3,
"cam2ego": N x 4 x 4[, "points": P x 5]}, "label": K x X x Y uint8, "meta": {...}}``; points
are (x, y, z, intensity, time lag in s). :func:`collate_bev` stacks samples and pads the
points (``points_mask`` marks the real ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from densediff.data.transforms import normalize, to_tensor
from densediff.tasks.bev import BEVGrid

if TYPE_CHECKING:
    from densediff.config import BEVDataConfig, DataConfig

__all__ = ["BEVDataset", "BEVRecord", "MapGeometry", "bev_augmentation", "collate_bev",
           "example_inputs",
           "image_affine", "output_grid", "feature_grid", "rasterize_map", "warp_image"]

Polygon = tuple[np.ndarray, list[np.ndarray]]
"""(exterior N x 2, [hole M x 2, ...]) in metres."""


@dataclass
class MapGeometry:
    """Vector map in one frame: per class, filled polygons (with holes) and polylines."""

    polygons: dict[str, list[Polygon]] = field(default_factory=dict)
    lines: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def transformed(self, m: np.ndarray) -> MapGeometry:
        """The geometry moved by the 2-D affine map ``m`` (2 x 3 or 3 x 3): p -> M p + t."""
        a, t = np.asarray(m, np.float64)[:2, :2], np.asarray(m, np.float64)[:2, 2]
        f = lambda pts: np.asarray(pts, np.float64) @ a.T + t
        return MapGeometry(
            {c: [(f(ext), [f(h) for h in holes]) for ext, holes in polys]
             for c, polys in self.polygons.items()},
            {c: [f(line) for line in lines] for c, lines in self.lines.items()})


@dataclass
class BEVRecord:
    """One untransformed sample (ego frame)."""

    images: list[Image.Image]
    """RGB camera images, in the order of ``data.bev.cameras``."""
    intrinsics: np.ndarray
    """N x 3 x 3 pinhole matrices of the images as loaded."""
    cam2ego: np.ndarray
    """N x 4 x 4: camera frame (x right, y down, z forward) -> ego frame."""
    map: MapGeometry
    points: np.ndarray | None = None
    """P x 5 LiDAR points in the ego frame: x, y, z, intensity, time lag (s)."""
    name: str = ""
    paths: list[str] = field(default_factory=list)


def output_grid(bev: BEVDataConfig) -> BEVGrid:
    """The label grid (``xbound``/``ybound``)."""
    return BEVGrid(tuple(bev.xbound), tuple(bev.ybound))


def feature_grid(bev: BEVDataConfig) -> BEVGrid:
    """The BEV feature grid (``feat_xbound``/``feat_ybound``)."""
    return BEVGrid(tuple(bev.feat_xbound), tuple(bev.feat_ybound))


def rasterize_map(geom: MapGeometry, grid: BEVGrid, classes: list[str],
                  line_width: float = 1.0) -> np.ndarray:
    """Rasterise a map (in the grid's frame) into K x X x Y {0, 1} layers.

    Polygons are filled (holes cleared) and polylines drawn ``line_width`` wide (at least one
    cell) by Pillow on the cell grid. As with the nuScenes map API that BEVFusion uses
    (``cv2.fillPoly`` / ``cv2.polylines`` on vertices rounded to the canvas, lines 2 pixels = 1 m
    wide on the 0.5 m grid), every cell whose centre is inside is set, and so may be cells that
    the boundary only touches (up to half a cell outside).
    """
    nx, ny = grid.shape
    (sx, sy), (lx, ly) = grid.step, grid.low
    width = max(1, int(round(line_width / min(sx, sy))))
    out = np.zeros((len(classes), nx, ny), np.uint8)

    def pix(pts: np.ndarray) -> list[tuple[float, float]]:
        # PIL pixel i is centred at coordinate i; column = ix, row = iy.
        p = np.asarray(pts, np.float64)
        return list(zip((p[:, 0] - lx) / sx - 0.5, (p[:, 1] - ly) / sy - 0.5))

    for k, name in enumerate(classes):
        polys, lines = geom.polygons.get(name, []), geom.lines.get(name, [])
        if not polys and not lines:
            continue
        canvas = Image.new("L", (nx, ny), 0)
        draw = ImageDraw.Draw(canvas)
        for ext, holes in polys:
            if len(ext) >= 3:
                draw.polygon(pix(ext), fill=1)
                for hole in holes:
                    if len(hole) >= 3:
                        draw.polygon(pix(hole), fill=0)
        for line in lines:
            if len(line) >= 2:
                draw.line(pix(line), fill=1, width=width)
        out[k] = np.asarray(canvas, np.uint8).T
    return out


# ------------------------------------------------------------------------------- augmentation


def image_affine(resize: float, crop: tuple[float, float], flip_width: int | None = None,
                 rotate_deg: float = 0.0, out_size: tuple[int, int] | None = None) -> np.ndarray:
    """3 x 3 pixel map of BEVFusion's image augmentation: scale by ``resize``, shift by
    ``-crop`` (x, y), mirror within ``flip_width`` (None: no flip), then rotate by
    ``rotate_deg`` about the centre of the ``out_size`` (h, w) crop. Pixel coordinates are
    continuous (pixel i spans [i, i + 1))."""
    a = np.diag([resize, resize, 1.0])
    a[:2, 2] = -np.asarray(crop, np.float64)
    if flip_width is not None:
        a = np.array([[-1.0, 0, flip_width], [0, 1, 0], [0, 0, 1]]) @ a
    if rotate_deg:
        h, w = out_size
        c, s = math.cos(math.radians(rotate_deg)), math.sin(math.radians(rotate_deg))
        centre = np.array([w / 2, h / 2])
        r = np.eye(3)
        r[:2, :2] = [[c, -s], [s, c]]
        r[:2, 2] = centre - r[:2, :2] @ centre
        a = r @ a
    return a


def sample_image_affine(size: tuple[int, int], bev: BEVDataConfig, train: bool,
                        rng: np.random.Generator | None) -> np.ndarray:
    """The augmentation of one camera image of ``size`` (h, w) (BEVFusion ``ImageAug3D``):
    resize by U(``resize_range``) in training (``test_resize`` in evaluation), keep the bottom
    rows of the ``image_size`` crop, a random column offset (centred in evaluation); in
    training a random flip and rotation."""
    h, w = size
    fh, fw = bev.image_size
    if train:
        resize = float(rng.uniform(*bev.resize_range))
    else:
        resize = bev.test_resize if bev.test_resize is not None else fw / w
    nh, nw = int(h * resize), int(w * resize)
    top = nh - fh
    left = float(rng.integers(0, max(0, nw - fw) + 1)) if train else max(0, nw - fw) / 2
    flip = fw if train and bev.image_flip and rng.random() < 0.5 else None
    rot = float(rng.uniform(-bev.rotate, bev.rotate)) if train and bev.rotate > 0 else 0.0
    return image_affine(resize, (int(left), top), flip, rot, (fh, fw))


def warp_image(img: Image.Image, a: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    """Apply the pixel map ``a`` to an image; H x W x 3 uint8 of ``out_size`` (h, w), 0 outside
    the source."""
    inv = np.linalg.inv(a)
    return np.asarray(img.convert("RGB").transform(
        (out_size[1], out_size[0]), Image.Transform.AFFINE, tuple(inv[:2].ravel()),
        resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0)))


def bev_augmentation(bev: BEVDataConfig, rng: np.random.Generator) -> np.ndarray:
    """4 x 4 scene transform: rotation about z by U(+-``bev_rotate``) degrees, scale
    U(``bev_scale``), then flips of x and of y with probability 0.5 each (``bev_flip``)."""
    th = math.radians(rng.uniform(-bev.bev_rotate, bev.bev_rotate)) if bev.bev_rotate else 0.0
    s = float(rng.uniform(*bev.bev_scale))
    t = np.eye(4)
    t[:2, :2] = s * np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    t[2, 2] = s
    if bev.bev_flip:
        flip = np.diag([-1.0 if rng.random() < 0.5 else 1.0,
                        -1.0 if rng.random() < 0.5 else 1.0, 1.0, 1.0])
        t = flip @ t
    return t


# ------------------------------------------------------------------------------- dataset


class BEVDataset(Dataset):
    """Base of the BEV datasets: subclasses implement ``__len__`` and :meth:`load`.

    Args:
        data: the ``data`` config section (``data.bev``, mean/std).
        train: training augmentation (image and scene) if True.
        seed: run seed; the augmentation RNG of item ``index`` is ``default_rng([seed,
            index])`` (or ``default_rng(seed)`` for an ``(index, seed)`` item).
        name: dataset name for messages.
    """

    def __init__(self, data: DataConfig, train: bool, seed: int = 0, name: str = "bev"):
        self.data = data
        self.bev = data.bev
        self.train = train
        self.seed = seed
        self.name = name
        self.class_names = list(data.bev.classes)
        self.num_classes = len(self.class_names)
        self.grid = output_grid(data.bev)

    def load(self, index: int) -> BEVRecord:
        raise NotImplementedError

    def __repr__(self) -> str:
        mode = "train" if self.train else "test"
        return (f"{type(self).__name__}({self.name}, {len(self)} samples, "
                f"{len(self.bev.cameras)} cameras, {mode} pipeline)")

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        index = int(index)
        if index < 0:
            index += len(self)
        rec = self.load(index)
        rng = np.random.default_rng(seed if seed is not None else [self.seed, index])
        bev = self.bev
        scene = bev_augmentation(bev, rng) if self.train else np.eye(4)
        images, intrinsics = [], []
        for img, k in zip(rec.images, rec.intrinsics):
            a = sample_image_affine((img.height, img.width), bev, self.train, rng)
            images.append(to_tensor(normalize(warp_image(img, a, bev.image_size),
                                              self.data.mean, self.data.std)))
            intrinsics.append(a @ k)
        cam2ego = scene @ rec.cam2ego
        geom = rec.map.transformed(scene[[0, 1]][:, [0, 1, 3]])
        label = rasterize_map(geom, self.grid, self.class_names)
        inputs = {"images": torch.stack(images),
                  "intrinsics": torch.as_tensor(np.stack(intrinsics), dtype=torch.float32),
                  "cam2ego": torch.as_tensor(cam2ego, dtype=torch.float32)}
        if bev.lidar:
            pts = np.zeros((0, 5), np.float32) if rec.points is None else rec.points
            pts = np.asarray(pts, np.float64).copy()
            pts[:, :3] = pts[:, :3] @ scene[:3, :3].T + scene[:3, 3]
            if bev.max_points is not None and len(pts) > bev.max_points:
                keep = (np.sort(rng.choice(len(pts), bev.max_points, replace=False)) if self.train
                        else np.linspace(0, len(pts) - 1, bev.max_points).round().astype(int))
                pts = pts[keep]
            inputs["points"] = torch.as_tensor(pts, dtype=torch.float32)
        return {"image": inputs, "label": torch.from_numpy(label),
                "meta": {"name": rec.name, "index": index, "paths": list(rec.paths),
                         "ori_size": tuple(label.shape[-2:]),
                         "img_size": tuple(bev.image_size)}}


def example_inputs(bev: BEVDataConfig, batch: int = 1, device: torch.device | str = "cpu",
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Random BEV model inputs of the configured shapes (``data.bev.image_size`` and cameras,
    the generated world's camera rig, random points when ``data.bev.lidar``): for timing and
    FLOP counts."""
    from densediff.data.bev_world import camera_rig

    g = torch.Generator().manual_seed(seed)
    k, c2e = camera_rig(tuple(bev.image_size), cameras=bev.cameras)
    n = len(bev.cameras)
    inputs = {"images": torch.randn(batch, n, 3, *bev.image_size, generator=g),
              "intrinsics": torch.as_tensor(k, dtype=torch.float32).expand(batch, -1, -1, -1),
              "cam2ego": torch.as_tensor(c2e, dtype=torch.float32).expand(batch, -1, -1, -1)}
    if bev.lidar:
        inputs["points"] = torch.randn(batch, 20000, 5, generator=g) * torch.tensor(
            [20.0, 20.0, 1.0, 0.3, 0.2])
        inputs["points_mask"] = torch.ones(batch, 20000, dtype=torch.bool)
    return {key: v.contiguous().to(device) for key, v in inputs.items()}


def collate_bev(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack BEV samples; points are zero-padded to the largest count, with ``points_mask``
    (B x P bool) marking real points."""
    keys = batch[0]["image"].keys()
    inputs = {k: torch.stack([b["image"][k] for b in batch]) for k in keys if k != "points"}
    if "points" in keys:
        pts = [b["image"]["points"] for b in batch]
        n = max(1, max(len(p) for p in pts))
        inputs["points"] = torch.zeros(len(pts), n, 5)
        inputs["points_mask"] = torch.zeros(len(pts), n, dtype=torch.bool)
        for i, p in enumerate(pts):
            inputs["points"][i, :len(p)] = p
            inputs["points_mask"][i, :len(p)] = True
    return {"image": inputs, "label": torch.stack([b["label"] for b in batch]),
            "meta": [b.get("meta", {}) for b in batch]}
