"""Procedural 3-D rooms rendered by ray casting, with exact depth (the ``generated`` depth data).

A scene (:func:`sample_depth_scene`) is a pinhole camera inside a box-shaped room:

* camera at height U(1.0, 1.8) m, pitch U(-6, 10) degrees (positive looks down), yaw
  U(-10, 10) degrees, horizontal field of view U(55, 75) degrees, square pixels, principal point
  at the image centre;
* the room: floor ``y = 0``, side walls ``x = x_left < 0`` and ``x = x_right > 0``, back wall
  ``z = z_back`` with ``z_back`` in U(0.3, 0.95) x max_depth, walls U(2.4, 3.2) m high; with
  probability 0.6 a ceiling closes the room, otherwise rays leaving over the walls see a sky
  (no depth, value 0);
* 2-5 objects standing on the floor: spheres, axis-aligned boxes and yawed boxes, sized with
  the room;
* every surface has a world-space texture (checker, stripes or smooth noise, two random
  colours), so its pattern shrinks with distance, and Lambertian shading from a point light
  whose intensity falls off with distance, plus a little pixel noise.

The whole scene is then scaled uniformly (which scales depth exactly) if needed so that every
point of the room lies at most 0.95 x max_depth in front of the camera: valid depth is always in
(0, max_depth].

:func:`render_depth_scene` casts one ray per pixel centre, vectorised in numpy. The depth is the
z-depth (distance along the optical axis, not along the ray): with the camera-frame ray
``((u - cx) / f, (v - cy) / f, 1)`` for pixel centre (u, v) = (col + 0.5, row + 0.5), the hit
parameter of that unnormalised ray is the depth itself. ``density < 1`` keeps a LiDAR-like
subset of the depth pixels (random scan lines, random points along them); the others are 0.
The room's planes and the boxes are hit by :mod:`densediff.data.worlds.geometry` (shared with
the BEV ray caster).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from densediff.data.depth import DepthDataset, depth_scale_for
from densediff.data.worlds.common import colour_pair, generated_items, scene_rng
from densediff.data.worlds.geometry import plane_hit, slab_hit

if TYPE_CHECKING:
    from densediff.config import DataConfig

SURFACES = ("left_wall", "right_wall", "floor", "ceiling", "back_wall", "sky")
"""Surface ids of :func:`render_depth_scene` ``ids`` (objects are 6, 7, ...)."""
SKY = 5


@dataclass
class Camera:
    """Pinhole camera at (0, height, 0) in a y-up world; pitch > 0 looks down."""

    height: float
    pitch: float
    """Radians; positive tilts the optical axis down towards the floor."""
    yaw: float
    """Radians, about the world y axis."""
    hfov: float
    """Horizontal field of view (radians)."""

    def rotation(self) -> np.ndarray:
        """3 x 3 matrix taking camera-frame vectors (x right, y down, z forward) to the world."""
        cp, sp, cy, sy = np.cos(self.pitch), np.sin(self.pitch), np.cos(self.yaw), np.sin(self.yaw)
        flip = np.diag([1.0, -1.0, 1.0])  # camera y (down) -> world -y
        rx = np.array([[1.0, 0.0, 0.0], [0.0, cp, -sp], [0.0, sp, cp]])
        ry = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
        return ry @ rx @ flip

    def focal(self, width: int) -> float:
        """Focal length in pixels for an image ``width`` pixels wide."""
        return (width / 2.0) / np.tan(self.hfov / 2.0)


@dataclass
class Texture:
    kind: str
    """checker | stripes | noise."""
    c1: np.ndarray
    c2: np.ndarray
    period: float
    """Metres."""
    dirs: np.ndarray
    """(3, 3) unit directions of the stripes/noise waves."""
    phases: np.ndarray


@dataclass
class Obj:
    kind: str
    """sphere | box."""
    center: np.ndarray
    size: np.ndarray
    """Sphere: (r, r, r); box: half-extents (a, h, b) in its own frame."""
    yaw: float = 0.0


@dataclass
class DepthScene:
    """A room, its objects, textures and light (see the module docstring); metres."""

    camera: Camera
    x_left: float
    x_right: float
    z_back: float
    wall_height: float
    ceiling: bool
    objects: list[Obj] = field(default_factory=list)
    textures: list[Texture] = field(default_factory=list)
    """One per surface id (walls, floor, ceiling, back wall, sky placeholder, then objects)."""
    light: np.ndarray = field(default_factory=lambda: np.zeros(3))
    light_range: float = 1.0

    def scaled(self, s: float) -> DepthScene:
        """The same scene scaled by ``s`` about the world origin (depth scales by ``s``)."""
        cam = Camera(self.camera.height * s, self.camera.pitch, self.camera.yaw, self.camera.hfov)
        objs = [Obj(o.kind, o.center * s, o.size * s, o.yaw) for o in self.objects]
        texs = [Texture(t.kind, t.c1, t.c2, t.period * s, t.dirs, t.phases) for t in self.textures]
        return DepthScene(cam, self.x_left * s, self.x_right * s, self.z_back * s,
                          self.wall_height * s, self.ceiling, objs, texs, self.light * s,
                          self.light_range * s)

    def max_depth(self) -> float:
        """The largest z-depth of any point of the room box (a bound for every visible pixel)."""
        cam = self.camera
        forward = cam.rotation()[:, 2]
        corners = np.array([[x, y, z] for x in (self.x_left, self.x_right)
                            for y in (0.0, self.wall_height) for z in (0.0, self.z_back)])
        return float(((corners - np.array([0.0, cam.height, 0.0])) @ forward).max())


def _texture(rng: np.random.Generator, unit: float) -> Texture:
    c1, c2 = colour_pair(rng, sat=(0.2, 0.9), val=(0.35, 0.95), hue_shift=0.15,
                         sat_mult=(0.4, 1.3), val_mult=(0.4, 1.4))
    dirs = rng.normal(size=(3, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    kind = ("checker", "stripes", "noise")[int(rng.integers(3))]
    return Texture(kind, c1, c2, rng.uniform(0.25, 0.8) * unit, dirs,
                   rng.uniform(0.0, 2 * np.pi, 3))


def sample_depth_scene(rng: np.random.Generator, max_depth: float) -> DepthScene:
    """Draw a scene (see the module docstring) whose depths are all in (0, max_depth]."""
    cam = Camera(height=rng.uniform(1.0, 1.8), pitch=np.deg2rad(rng.uniform(-6.0, 10.0)),
                 yaw=np.deg2rad(rng.uniform(-10.0, 10.0)), hfov=np.deg2rad(rng.uniform(55.0, 75.0)))
    z_back = rng.uniform(0.3, 0.95) * max_depth
    half = z_back * np.tan(cam.hfov / 2 + abs(cam.yaw)) * rng.uniform(0.6, 1.3)
    half = max(half, 1.0)
    x_left, x_right = -half * rng.uniform(0.7, 1.3), half * rng.uniform(0.7, 1.3)
    wall_h = rng.uniform(2.4, 3.2)
    unit = max(1.0, z_back / 6.0)  # object and texture scale grows with the room
    scene = DepthScene(cam, x_left, x_right, z_back, wall_h, bool(rng.random() < 0.6))
    scene.textures = [_texture(rng, unit) for _ in SURFACES]
    for _ in range(int(rng.integers(2, 6))):
        kind = ("sphere", "box", "box_yawed")[int(rng.integers(3))]
        r = rng.uniform(0.25, 0.7) * unit
        z = rng.uniform(min(1.5 + r, 0.5 * z_back), max(0.85 * z_back - r, 0.5 * z_back))
        ang = cam.yaw + rng.uniform(-0.4, 0.4) * cam.hfov
        x = float(np.clip(z * np.tan(ang), x_left + 1.5 * r, x_right - 1.5 * r))
        if kind == "sphere":
            r = min(r, 0.45 * wall_h)
            obj = Obj("sphere", np.array([x, r, z]), np.array([r, r, r]))
        else:
            hgt = min(rng.uniform(0.3, 1.6) * r, 0.45 * wall_h)
            a, b = r * rng.uniform(0.5, 1.0), r * rng.uniform(0.5, 1.0)
            yaw = rng.uniform(-np.pi / 4, np.pi / 4) if kind == "box_yawed" else 0.0
            obj = Obj("box", np.array([x, hgt, z]), np.array([a, hgt, b]), yaw)
        scene.objects.append(obj)
        scene.textures.append(_texture(rng, unit))
    scene.light = np.array([rng.uniform(x_left, x_right) * 0.5, wall_h * rng.uniform(0.7, 0.95),
                            rng.uniform(0.0, 0.6) * z_back])
    scene.light_range = z_back * rng.uniform(0.4, 0.9)
    m = scene.max_depth()
    if m > 0.95 * max_depth:
        scene = scene.scaled(0.95 * max_depth / m)
    return scene


def _rot_y(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _hit_sphere(origin: np.ndarray, d: np.ndarray, obj: Obj) -> tuple[np.ndarray, np.ndarray]:
    """Ray parameters (inf: miss) and unit normals (3 x N) of the first hit on a sphere; ``d``
    is 3 x N."""
    r = obj.size[0]
    o = origin - obj.center
    a = d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
    b = 2.0 * (d[0] * o[0] + d[1] * o[1] + d[2] * o[2])
    c = o @ o - r * r
    disc = b * b - 4 * a * c
    with np.errstate(invalid="ignore"):
        t = (-b - np.sqrt(disc)) / (2 * a)
    t = np.where((disc >= 0) & (t > 0), t, np.inf)
    tt = np.where(np.isfinite(t), t, 0.0)
    return t, (o[:, None] + tt * d) / r


def _hit_box(origin: np.ndarray, d: np.ndarray, obj: Obj) -> tuple[np.ndarray, np.ndarray]:
    """As :func:`_hit_sphere` for a (yawed) box."""
    rot = _rot_y(obj.yaw)  # box frame -> world
    o = rot.T @ (origin - obj.center)
    dl = rot.T @ d
    near, far, axis = slab_hit(o, dl, obj.size)  # divides; a grazing ray on a face misses
    t = np.where((near <= far) & (near > 0), near, np.inf)
    n_local = np.zeros_like(d)
    for k in range(3):
        n_local[k] = np.where(axis == k, -np.sign(dl[k]), 0.0)
    return t, rot @ n_local


def _pattern(tex: Texture, p: np.ndarray) -> np.ndarray:
    """Mixing weight in [0, 1] of the two texture colours at world points ``p`` (N x 3)."""
    if tex.kind == "checker":
        q = np.floor(p / tex.period + tex.phases / (2 * np.pi))
        return (q.sum(1) % 2).astype(np.float64)
    if tex.kind == "stripes":
        return 0.5 + 0.5 * np.sin(2 * np.pi * (p @ tex.dirs[0]) / tex.period + tex.phases[0])
    waves = np.sin(2 * np.pi * (p @ tex.dirs.T) / (tex.period * np.array([1.0, 1.7, 2.9]))
                   + tex.phases)
    return np.clip(0.5 + waves.sum(1) / 4.0, 0.0, 1.0)


def render_scene_arrays(scene: DepthScene, size: tuple[int, int]
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ray-cast ``scene`` at ``size`` (h, w).

    Returns:
        (float64 colour H x W x 3 before noise and quantisation, float64 z-depth H x W with
        ``inf`` for the sky, int64 surface id H x W: indices into ``SURFACES``, objects from 6).
    """
    h, w = size
    cam = scene.camera
    f = cam.focal(w)
    v, u = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    dc = np.stack([((u - w / 2.0) / f).ravel(), ((v - h / 2.0) / f).ravel(), np.ones(h * w)])
    d = cam.rotation() @ dc  # 3 x N world directions; hit parameter t = z-depth
    origin = np.array([0.0, cam.height, 0.0])
    # leaving the room box: the nearest of the walls/floor/top the ray heads to
    tx = np.where(d[0] > 0, plane_hit(scene.x_right - origin[0], d[0]),
                  np.where(d[0] < 0, plane_hit(scene.x_left - origin[0], d[0]), np.inf))
    ty = np.where(d[1] < 0, plane_hit(-origin[1], d[1]),
                  np.where(d[1] > 0, plane_hit(scene.wall_height - origin[1], d[1]), np.inf))
    tz = np.where(d[2] > 0, plane_hit(scene.z_back - origin[2], d[2]), np.inf)
    t = np.minimum(np.minimum(tx, ty), tz)
    ids = np.where(t == tz, 4, np.where(t == ty, np.where(d[1] < 0, 2, 3),
                                        np.where(d[0] > 0, 1, 0)))
    if not scene.ceiling:
        ids = np.where(ids == 3, SKY, ids)
    room_normals = np.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0],
                             [0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    normals = room_normals[ids].T.copy()
    for k, obj in enumerate(scene.objects):
        t_obj, n_obj = (_hit_sphere if obj.kind == "sphere" else _hit_box)(origin, d, obj)
        closer = t_obj < t
        t = np.where(closer, t_obj, t)
        ids = np.where(closer, len(SURFACES) + k, ids)
        normals = np.where(closer, n_obj, normals)
    sky = ids == SKY
    p = origin[:, None] + np.where(sky, 0.0, t) * d  # 3 x N hit points
    colour = np.zeros((h * w, 3))
    for sid in np.unique(ids):
        m = ids == sid
        if sid == SKY:
            el = np.clip(d[1, m] / np.sqrt((d[:, m] ** 2).sum(0)), 0.0, 1.0)[:, None]
            colour[m] = np.array([200.0, 215.0, 235.0]) * (1 - el) + np.array([70, 120, 200]) * el
            continue
        tex = scene.textures[sid]
        colour[m] = tex.c1 + (tex.c2 - tex.c1) * _pattern(tex, p[:, m].T)[:, None]
    to_light = scene.light[:, None] - p
    dist = np.sqrt((to_light ** 2).sum(0)) + 1e-9
    lambert = np.clip((normals * to_light).sum(0) / dist, 0.0, 1.0)
    shade = 0.22 + 0.95 * lambert / (1.0 + (dist / scene.light_range) ** 2)
    colour = np.where(sky[:, None], colour, colour * shade[:, None])
    depth = np.where(sky, np.inf, t)
    return colour.reshape(h, w, 3), depth.reshape(h, w), ids.reshape(h, w)


def lidar_mask(rng: np.random.Generator, size: tuple[int, int], density: float) -> np.ndarray:
    """A boolean keep-mask with about ``density`` of the pixels set, LiDAR-like: evenly spaced
    scan lines (all rows when ``density >= 0.25``, else a ``4 * density`` share of them, at a
    random offset) with points kept at random along them."""
    h, w = size
    if density >= 1.0:
        return np.ones(size, bool)
    row_share = min(1.0, 4.0 * density)
    n_rows = max(1, int(round(h * row_share)))
    rows = np.floor(rng.random() * h / n_rows + np.arange(n_rows) * h / n_rows).astype(np.int64)
    keep = np.zeros(size, bool)
    p = min(1.0, density * h / n_rows)
    keep[np.clip(rows, 0, h - 1)] = rng.random((n_rows, w)) < p
    return keep


def render_depth_scene(rng: np.random.Generator, size: tuple[int, int], max_depth: float,
                       density: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Draw and render one scene (see the module docstring).

    Args:
        rng: the only source of randomness (scene, pixel noise, GT subset).
        size: (h, w).
        max_depth: every valid depth lies in (0, max_depth].
        density: share of pixels that keep their depth (< 1: LiDAR-like sparse GT).

    Returns:
        (uint8 RGB H x W x 3, float32 z-depth H x W in metres; 0 = no depth: sky, or dropped
        by ``density``).
    """
    scene = sample_depth_scene(rng, max_depth)
    colour, depth, _ = render_scene_arrays(scene, size)
    colour = colour + rng.normal(0.0, 3.0, colour.shape)
    img = np.clip(colour, 0, 255).round().astype(np.uint8)
    depth = np.where(np.isfinite(depth), depth, 0.0).astype(np.float32)
    depth = np.minimum(depth, np.float32(max_depth))  # guards float32 rounding at the bound
    if density < 1.0:
        depth = np.where(lidar_mask(rng, size, density), depth, np.float32(0.0))
    return img, depth


# --------------------------------------------------------------------------------------------
# the dataset



class GeneratedDepthDataset(DepthDataset):
    """Rendered rooms (see the module docstring) with the depth pipelines.

    Scene ``index`` of ``split`` is ``render_depth_scene(default_rng([data.gen_seed, code,
    index]), data.gen_size, data.depth.max_depth, data.depth.gen_density)`` with code 0/1/2 for
    train/val/test; counts come from ``data.gen_num_{train,val,test}``. ``depth_scale`` (for
    16-bit outputs) is ``data.depth.depth_scale``, else 1000 when ``max_depth * 1000`` fits in
    16 bits, else 256.

    Args:
        data: the ``data`` config section.
        split: train | val | test.
        train: training pipeline if True, else the test pipeline.
        seed: run seed for the augmentation RNG (scenes depend on ``data.gen_seed`` only).
    """

    def __init__(self, data: DataConfig, split: str, train: bool, seed: int = 0):
        scale = depth_scale_for("generated", data.depth.depth_scale, data.depth.max_depth)
        super().__init__(generated_items(data, split), data, train, seed,
                         name=f"generated/{split}", depth_scale=scale)
        self.split = split

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        rng = scene_rng(self.data, self.split, index)
        img, depth = render_depth_scene(rng, tuple(self.data.gen_size), self.data.depth.max_depth,
                                        self.data.depth.gen_density)
        path = self.files[index][0]
        img, depth = self._kb_crop(img, depth, path)
        return img, depth, path
