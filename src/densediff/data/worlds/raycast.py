"""Ray casting of the generated BEV worlds (:mod:`densediff.data.worlds.roads`): six cameras
and a spinning LiDAR.

Everything is in the ego frame (x forward, y left, z up, metres; the ground is ``z = 0``).
:func:`camera_rig` gives the six nuScenes channels (optical-axis yaw +55, 0, -55, +110, 180,
-110 degrees; height 1.5 m; 3 degrees down; horizontal field of view 70 degrees, the back
camera 110; square pixels; principal point at the image centre; pixel i spans [i, i + 1)),
with small random jitter per scene. :func:`render_cameras` casts 2 x 2 rays per pixel
(vectorised numpy), hitting the ground plane and the boxes (slab test in the box frame,
Lambertian sun shading, windows on buildings); rays above the horizon see a sky gradient;
hits fade into the horizon colour with distance (haze, e-folding 120-300 m); an exposure
factor and Gaussian pixel noise finish the image. :func:`lidar_points` casts a 32-beam
spinning sensor (elevations -30..+10 degrees, 0.75 degree azimuth steps, 50 m range) at
(0.95, 0, 1.84) against the same surfaces, with nuScenes-like intensities in [0, 255] by
material (paint bright, asphalt dark, grass and concrete in between), range noise and 5 %
dropout.

Box hits use the slab test of :func:`densediff.data.worlds.geometry.slab_hit` (shared with the
depth rooms). This module reads worlds but never builds one, so it imports nothing from
:mod:`densediff.data.worlds.roads` at run time (:func:`example_inputs` uses
:func:`camera_rig`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from densediff.config import NUSCENES_CAMERAS
from densediff.data.worlds.geometry import plane_hit, slab_hit

if TYPE_CHECKING:
    from densediff.config import BEVDataConfig
    from densediff.data.worlds.roads import Box, World

__all__ = ["CAMERA_PITCH", "CAMERA_SPECS", "LIDAR_ORIGIN", "camera_rays", "camera_rig",
           "example_inputs", "lidar_points", "project_points", "render_cameras"]

CAMERA_SPECS = {
    # name: (x, y, z of the optical centre in metres, yaw in degrees, horizontal FOV in degrees)
    "CAM_FRONT_LEFT": (1.52, 0.49, 1.51, 55.0, 70.0),
    "CAM_FRONT": (1.70, 0.00, 1.51, 0.0, 70.0),
    "CAM_FRONT_RIGHT": (1.52, -0.49, 1.51, -55.0, 70.0),
    "CAM_BACK_LEFT": (1.04, 0.48, 1.53, 110.0, 70.0),
    "CAM_BACK": (0.03, 0.00, 1.57, 180.0, 110.0),
    "CAM_BACK_RIGHT": (1.05, -0.48, 1.53, -110.0, 70.0),
}
"""Nominal rig of the six nuScenes channels (ego frame; positive yaw turns left)."""
CAMERA_PITCH = 3.0
"""Nominal downward pitch of every camera (degrees)."""
LIDAR_ORIGIN = (0.95, 0.0, 1.84)


# --------------------------------------------------------------------------------------------
# cameras


def camera_rig(image_size: tuple[int, int], rng: np.random.Generator | None = None,
               cameras: Sequence[str] = NUSCENES_CAMERAS) -> tuple[np.ndarray, np.ndarray]:
    """Intrinsics (N x 3 x 3) and cam2ego (N x 4 x 4) of the named cameras (``CAMERA_SPECS``)
    for images of ``image_size`` (h, w).

    With ``rng``, each camera is jittered: position +-5 cm (height +-10 cm), yaw +-2, pitch +-1,
    roll +-1 and field of view +-2 degrees.
    """
    h, w = image_size
    ks, poses = [], []
    for name in cameras:
        if name not in CAMERA_SPECS:
            raise ValueError(f"unknown camera {name!r}; known: {', '.join(CAMERA_SPECS)}")
        x, y, z, yaw, fov = CAMERA_SPECS[name]
        pitch, roll = CAMERA_PITCH, 0.0
        if rng is not None:
            x, y = x + rng.uniform(-0.05, 0.05), y + rng.uniform(-0.05, 0.05)
            z += rng.uniform(-0.1, 0.1)
            yaw, pitch = yaw + rng.uniform(-2, 2), pitch + rng.uniform(-1, 1)
            roll, fov = rng.uniform(-1, 1), fov + rng.uniform(-2, 2)
        f = (w / 2) / math.tan(math.radians(fov) / 2)
        ks.append(np.array([[f, 0.0, w / 2], [0.0, f, h / 2], [0.0, 0.0, 1.0]]))
        ya, pa, ra = math.radians(yaw), math.radians(pitch), math.radians(roll)
        fwd = np.array([math.cos(pa) * math.cos(ya), math.cos(pa) * math.sin(ya), -math.sin(pa)])
        right = np.array([math.sin(ya), -math.cos(ya), 0.0])
        down = np.cross(fwd, right)
        right, down = (right * math.cos(ra) + down * math.sin(ra),
                       down * math.cos(ra) - right * math.sin(ra))
        pose = np.eye(4)
        pose[:3, :3] = np.stack([right, down, fwd], 1)
        pose[:3, 3] = (x, y, z)
        poses.append(pose)
    return np.stack(ks), np.stack(poses)


def camera_rays(intrinsics: np.ndarray, cam2ego: np.ndarray, image_size: tuple[int, int],
                supersample: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Rays of one camera: origin (3,) and ego-frame directions (sH x sW x 3, not normalised:
    unit depth along the optical axis) through the centres of the ``supersample`` x
    ``supersample`` sub-pixels (pixel i spans [i, i + 1))."""
    h, w = image_size
    s = supersample
    m = cam2ego[:3, :3] @ np.linalg.inv(intrinsics)
    u = (np.arange(w * s) + 0.5) / s
    v = (np.arange(h * s) + 0.5) / s
    dirs = u[None, :, None] * m[:, 0] + (v[:, None] * m[:, 1] + m[:, 2])[:, None]
    return cam2ego[:3, 3].copy(), dirs


def project_points(points: np.ndarray, intrinsics: np.ndarray, cam2ego: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Ego-frame points (P x 3) -> (pixel coordinates P x 2 (u, v), depth along the optical
    axis P; <= 0 behind the camera)."""
    cam = (np.asarray(points, np.float64) - cam2ego[:3, 3]) @ cam2ego[:3, :3]
    z = cam[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = (cam @ np.asarray(intrinsics).T)[:, :2] / z[:, None]
    return uv, z


def _ray_box(origin: np.ndarray, d: np.ndarray, box: Box) -> tuple[np.ndarray, np.ndarray]:
    """First hit parameter (inf: none) and face (2 x axis + (1 if on the + side); axes
    along, across, up in the box frame) of rays ``origin + t d`` (d: N x 3) on a box, by the
    slab test in the box frame (:func:`~densediff.data.worlds.geometry.slab_hit`, reciprocal
    form, a slab whose plane holds the origin of a parallel ray ignored)."""
    c, s = math.cos(box.yaw), math.sin(box.yaw)
    rx, ry = float(origin[0] - box.centre[0]), float(origin[1] - box.centre[1])
    o = (c * rx + s * ry, -s * rx + c * ry, float(origin[2] - box.size[2] / 2))
    dx, dy = d[:, 0], d[:, 1]
    dl = (c * dx + s * dy, -s * dx + c * dy, d[:, 2])
    half = [float(box.size[k]) / 2 for k in range(3)]
    near, far, axis = slab_hit(o, dl, half, reciprocal=True, grazing="ignore")
    entered_neg = np.choose(axis, [dl[0] < 0, dl[1] < 0, dl[2] < 0])
    face = np.where(near > -np.inf, 2 * axis + entered_neg, 0)
    return np.where((near <= far) & (near > 1e-6), near, np.inf), face


def _face_normals(box: Box) -> np.ndarray:
    """6 x 3 ego-frame unit normals of a box's faces, indexed like :func:`_ray_box` faces."""
    c, s = math.cos(box.yaw), math.sin(box.yaw)
    local = np.array([[-1, 0, 0], [1, 0, 0], [0, -1, 0], [0, 1, 0], [0, 0, -1], [0, 0, 1]], float)
    return np.stack([c * local[:, 0] - s * local[:, 1], s * local[:, 0] + c * local[:, 1],
                     local[:, 2]], 1)


def _cast(origins: np.ndarray, oz: np.ndarray | float, d: np.ndarray, boxes: list[Box],
          candidates: list[tuple[int, int, np.ndarray]]
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First hits of rays from ``origins`` (C x 3) along ``d`` (N x 3); ``oz`` is the height of
    each ray's origin (N, or one value).

    ``candidates`` lists (box index, origin index, indices of the rays from that origin that
    may hit the box). Returns the hit parameter t (inf: sky), the surface (-1 sky, 0 ground,
    1 + k box k) and the box face (see :func:`_ray_box`).
    """
    dz = d[:, 2]
    t = plane_hit(-oz, dz).astype(d.dtype)  # the ground plane z = 0
    t[dz > -1e-6] = np.inf
    hit = np.where(np.isfinite(t), 0, -1).astype(np.int16)
    face = np.zeros(len(d), np.int8)
    for k, c, rows in candidates:
        tb, fb = _ray_box(origins[c], d[rows], boxes[k])
        closer = tb < t[rows]
        sel = rows[closer]
        t[sel], hit[sel], face[sel] = tb[closer], k + 1, fb[closer]
    return t, hit, face


def _box_colour(world: World, p: np.ndarray, face: np.ndarray, hit: np.ndarray) -> np.ndarray:
    """Shaded colour (N x 3 float32) of box hits at points p (N x 3) on ``face`` of box
    ``hit - 1``: Lambertian sun light; buildings get a grid of dark windows, cars dark glass
    on the upper part and a dark underbody."""
    out = np.zeros((len(p), 3), np.float32)
    for k in np.unique(hit):
        m = np.flatnonzero(hit == k)
        box = world.boxes[k - 1]
        col = np.empty((len(m), 3), np.float32)
        col[:] = box.colour
        z, side = p[m, 2], face[m] < 4
        normal = _face_normals(box)[face[m]]
        if box.kind == "building":
            along = (p[m, 0] * normal[:, 1] - p[m, 1] * normal[:, 0]) % 3.0  # along the wall
            zz = z % 3.0
            col[side & (along > 0.9) & (along < 2.1) & (zz > 1.0) & (zz < 2.2)] = (60, 75, 95)
        else:
            col[side & (z > 0.62 * float(box.size[2]))] = (40, 48, 58)
            col[z < 0.35] *= 0.35
        lambert = np.clip(normal @ world.sun, 0.0, 1.0).astype(np.float32)
        out[m] = col * (0.45 + 0.55 * lambert)[:, None]
    return out


def render_cameras(world: World, intrinsics: np.ndarray, cam2ego: np.ndarray,
                   image_size: tuple[int, int], rng: np.random.Generator | None = None,
                   noise: float = 3.0, supersample: int = 2) -> list[np.ndarray]:
    """Ray-cast the world into each camera.

    Args:
        world: the scene.
        intrinsics, cam2ego: N x 3 x 3 and N x 4 x 4 (:func:`camera_rig`).
        image_size: (h, w) of the images the intrinsics belong to.
        rng: source of the pixel noise (standard deviation ``noise``); None: no noise.
        supersample: rays per pixel along each axis (averaged: anti-aliasing).

    Returns:
        N images, H x W x 3 uint8.
    """
    h, w = image_size
    s = supersample
    n_cam, per = len(intrinsics), h * s * w * s
    d = np.empty((n_cam * per, 3), np.float32)
    oz = np.repeat(np.asarray(cam2ego)[:, 2, 3].astype(np.float32), per)
    candidates = []  # (box, camera, rays that may hit it)
    for c, (k_mat, pose) in enumerate(zip(intrinsics, cam2ego)):
        d[c * per:(c + 1) * per] = camera_rays(k_mat, pose, image_size, s)[1].reshape(-1, 3)
        for k, box in enumerate(world.boxes):
            rows = _box_rays(box, k_mat, pose, (h * s, w * s), s)
            if rows is not None and len(rows):
                candidates.append((k, c, rows + c * per))
    origins = np.asarray(cam2ego)[:, :3, 3]
    t, hit, face = _cast(origins, oz, d, world.boxes, candidates)
    dz, sky = d[:, 2], hit < 0
    norm = np.sqrt(np.einsum("ij,ij->i", d, d))
    tt = np.where(sky, np.float32(0.0), t)
    dist = tt * norm
    colour = np.zeros(d.shape, np.float32)
    ground = np.flatnonzero(hit == 0)
    cam, tg = ground // per, tt[ground]
    gx = origins[cam, 0].astype(np.float32) + tg * d[ground, 0]
    gy = origins[cam, 1].astype(np.float32) + tg * d[ground, 1]
    colour[ground] = world.ground_colour(gx, gy, dist[ground])
    obj = np.flatnonzero(hit > 0)
    if len(obj):
        p = origins[obj // per].astype(np.float32) + tt[obj, None] * d[obj]
        colour[obj] = _box_colour(world, p, face[obj], hit[obj])
    horizon = world.sky_horizon.astype(np.float32)
    if math.isfinite(world.haze):
        fade = np.exp(dist * np.float32(-1.0 / world.haze))
        colour -= horizon / np.float32(world.exposure)
        colour *= (fade * np.float32(world.exposure))[:, None]
        colour += horizon  # exposure * colour * fade + horizon * (1 - fade)
    else:
        colour *= np.float32(world.exposure)
    el = np.clip(dz[sky] / norm[sky], 0.0, 1.0) ** 0.6
    colour[sky] = horizon + (world.sky_zenith - world.sky_horizon).astype(np.float32) * el[:, None]
    colour = colour.reshape(n_cam, h, s, w, s, 3)
    img = sum(colour[:, :, i, :, j] for i in range(s) for j in range(s)) * np.float32(1.0 / s ** 2)
    if rng is not None and noise > 0:
        img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(noise)
    img = np.clip(img, 0, 255).round().astype(np.uint8)
    return list(img)


def _box_rays(box: Box, intrinsics: np.ndarray, cam2ego: np.ndarray, size: tuple[int, int],
              s: int) -> np.ndarray | None:
    """Indices of the (sub-pixel) rays of an ``size`` grid that may hit ``box``: its projected
    bounding rectangle (all rays if a corner is behind the camera; None if all are)."""
    c, sn = math.cos(box.yaw), math.sin(box.yaw)
    lx, ly, hz = box.size
    corners = np.array([[a * lx / 2, b * ly / 2, z] for a in (-1, 1) for b in (-1, 1)
                        for z in (0.0, hz)])
    corners = np.stack([box.centre[0] + c * corners[:, 0] - sn * corners[:, 1],
                        box.centre[1] + sn * corners[:, 0] + c * corners[:, 1], corners[:, 2]], 1)
    uv, z = project_points(corners, intrinsics, cam2ego)
    hs, ws = size
    if (z <= 0.05).all():
        return None
    if (z <= 0.05).any():
        return np.arange(hs * ws)
    u0, v0 = np.floor(uv.min(0) * s).astype(int) - 1
    u1, v1 = np.ceil(uv.max(0) * s).astype(int) + 1
    u0, u1, v0, v1 = max(u0, 0), min(u1, ws), max(v0, 0), min(v1, hs)
    if u0 >= u1 or v0 >= v1:
        return None
    vv, uu = np.mgrid[v0:v1, u0:u1]
    return (vv * ws + uu).ravel()


# --------------------------------------------------------------------------------------------
# LiDAR


def lidar_points(world: World, rng: np.random.Generator, beams: int = 32,
                 elevation: tuple[float, float] = (-30.0, 10.0), azimuth_step: float = 0.75,
                 max_range: float = 50.0, origin: tuple[float, float, float] = LIDAR_ORIGIN,
                 dropout: float = 0.05) -> np.ndarray:
    """A spinning-LiDAR sweep: P x 5 float32 (x, y, z, intensity 0..255, time lag 0).

    ``beams`` elevations evenly in ``elevation`` (degrees), azimuths every ``azimuth_step``
    degrees from a random start; returns within ``max_range`` m of ``origin`` on the ground or a
    box, with 2 cm range noise, ``dropout`` of them dropped. Intensity is the surface's
    reflectivity (ground: ``world.reflectivity`` of its material; boxes: their own) times
    1 + N(0, 0.15), plus N(0, 2).
    """
    el = np.radians(np.linspace(elevation[0], elevation[1], beams))
    az = np.radians(rng.uniform(0, azimuth_step) + np.arange(0.0, 360.0, azimuth_step))
    el, az = np.meshgrid(el, az, indexing="ij")
    d = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], -1).reshape(-1, 3)
    o = np.asarray(origin, np.float64)
    all_rows = np.arange(len(d))
    t, hit, _ = _cast(o[None], o[2], d, world.boxes,
                      [(k, 0, all_rows) for k in range(len(world.boxes))])
    keep = (hit >= 0) & (t <= max_range) & (rng.random(len(d)) >= dropout)
    t, hit, d = t[keep] + rng.normal(0.0, 0.02, int(keep.sum())), hit[keep], d[keep]
    p = o + t[:, None] * d
    refl = np.zeros(len(p))
    ground = hit == 0
    refl[ground] = world.reflectivity[world.material_at(p[ground, 0], p[ground, 1])]
    box_refl = np.array([b.reflectivity for b in world.boxes] or [0.0])
    refl[~ground] = box_refl[hit[~ground] - 1]
    inten = refl * (1.0 + rng.normal(0.0, 0.15, len(p))) + rng.normal(0.0, 2.0, len(p))
    out = np.zeros((len(p), 5), np.float32)
    out[:, :3], out[:, 3] = p, np.clip(inten, 0.0, 255.0)
    return out


def example_inputs(bev: BEVDataConfig, batch: int = 1, device: torch.device | str = "cpu",
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Random BEV model inputs of the configured shapes (``data.bev.image_size`` and cameras,
    the generated world's camera rig, random points when ``data.bev.lidar``): for timing and
    FLOP counts."""
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
