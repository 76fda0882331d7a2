"""BEV samples: multi-camera images with calibration, LiDAR points and a vector map.

A dataset (nuScenes, :mod:`densediff.data.nuscenes`; the generated world,
:mod:`densediff.data.worlds`) loads a :class:`BEVRecord` per sample, everything in the
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
from PIL import Image
from torch.utils.data import Dataset

from densediff.data.transforms import normalize, to_tensor
from densediff.utils.grid import BEVGrid, output_grid

if TYPE_CHECKING:
    from densediff.config import BEVDataConfig, DataConfig

__all__ = ["BEVDataset", "BEVRecord", "MapGeometry", "bev_augmentation", "collate_bev",
           "image_affine", "line_cells", "polygon_cells",
           "rasterize_map", "warp_image", "DIVIDER_WIDTH"]

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
    """One untransformed sample (ego frame; nuScenes with ``data.bev.frame: lidar``: the
    LIDAR_TOP frame, and "ego" below means that frame)."""

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


DIVIDER_WIDTH = 1.5
"""Width (m) of rasterised map lines (:func:`rasterize_map`): as the nuScenes devkit draws them
on BEVFusion's 0.5 m grid (``NuScenesMap.get_map_mask``: ``cv2.polylines`` with thickness 2,
which covers 3 pixels across an axis-aligned line and 2.94 on average over directions, i.e.
1.5 m; not the 2 pixels the thickness suggests)."""


def _cell_range(lo: np.ndarray, hi: np.ndarray, low: float, step: float, n: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Per interval ``[lo, hi]`` (metres), the cells ``[i0, i1)`` of an axis whose centre lies in
    it, clipped to ``[0, n)``."""
    i0 = np.clip(np.ceil((lo - low) / step - 0.5), 0, n).astype(np.int64)
    i1 = np.clip(np.floor((hi - low) / step - 0.5) + 1, 0, n).astype(np.int64)
    return i0, np.maximum(i1, i0)


def _expand(start: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(k, start[k] + j)`` for every k and ``0 <= j < count[k]`` (vectorised ranges)."""
    k = np.repeat(np.arange(len(count)), count)
    return k, start[k] + np.arange(len(k)) - np.repeat(np.cumsum(count) - count, count)


def _box_cells(grid: BEVGrid, lo: np.ndarray, hi: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(k, ix, iy)``: every cell whose centre lies in box k (B x 2 corners ``lo``, ``hi``)."""
    (nx, ny), (sx, sy), (lx, ly) = grid.shape, grid.step, grid.low
    x0, x1 = _cell_range(lo[:, 0], hi[:, 0], lx, sx, nx)
    y0, y1 = _cell_range(lo[:, 1], hi[:, 1], ly, sy, ny)
    k, j = _expand(np.zeros(len(lo), np.int64), (x1 - x0) * (y1 - y0))
    h = (y1 - y0)[k]
    return k, x0[k] + j // np.maximum(h, 1), y0[k] + j % np.maximum(h, 1)


def polygon_cells(rings: list[np.ndarray], grid: BEVGrid) -> tuple[np.ndarray, np.ndarray]:
    """``(ix, iy)`` of the cells whose centre lies inside a polygon: even-odd rule over its
    rings (exterior and holes, each N x 2 metres, closed implicitly), exact up to rounding.

    A scan line through a row of cell centres crosses an edge when ``y0 <= y < y1`` (its
    lower end counts, its upper one not), and a centre on an edge counts on the edge's right
    (``x >= crossing``): cells are half-open like the grid's, so the cells of shapes that meet
    at an edge never overlap nor leave a gap.
    """
    (nx, ny), (sx, sy), (lx, ly) = grid.shape, grid.step, grid.low
    rings = [np.asarray(r, np.float64).reshape(-1, 2) for r in rings]
    rings = [r for r in rings if len(r) >= 3]
    if not rings:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    a = np.concatenate(rings)
    b = np.concatenate([np.roll(r, -1, 0) for r in rings])
    # cell units: the centre of cell i is at i
    ax, ay = (a[:, 0] - lx) / sx - 0.5, (a[:, 1] - ly) / sy - 0.5
    bx, by = (b[:, 0] - lx) / sx - 0.5, (b[:, 1] - ly) / sy - 0.5
    r0 = np.clip(np.ceil(np.minimum(ay, by)), 0, ny).astype(np.int64)
    r1 = np.clip(np.ceil(np.maximum(ay, by)), 0, ny).astype(np.int64)
    e, iy = _expand(r0, np.maximum(r1 - r0, 0))  # (edge, row) crossings; no horizontal edges
    ea, eb = ay[e], by[e]
    x = ax[e] + (iy - ea) * (bx[e] - ax[e]) / (eb - ea)
    c = np.clip(np.ceil(x), 0, nx).astype(np.int64)  # first cell centred right of the crossing
    order = np.lexsort((c, iy))  # per row an even number of crossings: pair them up
    iy, c = iy[order], c[order]
    k, ix = _expand(c[0::2], c[1::2] - c[0::2])
    return ix, iy[0::2][k]


def line_cells(lines: list[np.ndarray], grid: BEVGrid, width: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """``(ix, iy)`` of the cells whose centre lies on polylines drawn ``width`` metres wide
    (may repeat): within ``width / 2`` of a vertex (round joins and caps), or within the band
    of a segment, ``-width / 2 <= s < width / 2`` across it (``s`` along the segment normal
    that points to +y, or +x for a segment along y: half-open like the grid's cells, so an
    axis-aligned line covers exactly ``width / step`` rows or columns when that is whole)."""
    pts = [np.asarray(p, np.float64).reshape(-1, 2) for p in lines]
    pts = [p for p in pts if len(p) >= 2]
    if not pts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    (sx, sy), (lx, ly) = grid.step, grid.low
    r = width / 2
    p = np.concatenate([q[:-1] for q in pts])
    q = np.concatenate([q[1:] for q in pts])
    length = np.hypot(*(q - p).T)
    p, q, length = p[length > 0], q[length > 0], length[length > 0]
    u = (q - p) / length[:, None]
    normal = np.stack([-u[:, 1], u[:, 0]], 1)
    flip = (normal[:, 1] < 0) | ((normal[:, 1] == 0) & (normal[:, 0] < 0))
    normal[flip] *= -1
    k, ix, iy = _box_cells(grid, np.minimum(p, q) - r, np.maximum(p, q) + r)
    rel = np.stack([lx + (ix + 0.5) * sx, ly + (iy + 0.5) * sy], 1) - p[k]
    t, s = (rel * u[k]).sum(1), (rel * normal[k]).sum(1)
    band = (t >= 0) & (t <= length[k]) & (s >= -r) & (s < r)
    v = np.concatenate(pts)
    kv, jx, jy = _box_cells(grid, v - r, v + r)
    disc = (lx + (jx + 0.5) * sx - v[kv, 0]) ** 2 + (ly + (jy + 0.5) * sy - v[kv, 1]) ** 2 < r * r
    return np.concatenate([ix[band], jx[disc]]), np.concatenate([iy[band], jy[disc]])


def rasterize_map(geom: MapGeometry, grid: BEVGrid, classes: list[str],
                  line_width: float = DIVIDER_WIDTH) -> np.ndarray:
    """Rasterise a map (in the grid's frame) into K x X x Y {0, 1} layers (``[k, ix, iy]``, x
    on the first spatial axis as everywhere in :class:`~densediff.utils.grid.BEVGrid`).

    A cell is set when its centre lies inside a polygon of the class (outside its holes;
    :func:`polygon_cells`) or on one of its polylines drawn ``line_width`` metres wide (at
    least one cell; :func:`line_cells`). Cell ``[ix, iy]`` is the grid's: it covers ``[xlo +
    ix step, xlo + (ix + 1) step)``, the cell LiDAR pillars and LSS pooling put a point in,
    so a label sits where the features of the same ground do. The nuScenes devkit's
    ``get_map_mask`` (BEVFusion's labels) draws lines as wide (:data:`DIVIDER_WIDTH`) but fills
    polygons one cell further towards +x and +y (``cv2.fillPoly`` on rounded vertices sets the
    pixels an edge passes through); ``tests/test_nuscenes_devkit.py`` compares the two.
    """
    nx, ny = grid.shape
    width = max(line_width, min(grid.step))
    out = np.zeros((len(classes), nx, ny), np.uint8)
    for k, name in enumerate(classes):
        for ext, holes in geom.polygons.get(name, []):
            if len(ext) >= 3:
                ix, iy = polygon_cells([ext, *holes], grid)
                out[k, ix, iy] = 1
        ix, iy = line_cells(geom.lines.get(name, []), grid, width)
        out[k, ix, iy] = 1
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
