"""The generated BEV world: camera geometry, rendering, LiDAR, determinism, labels, dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from densediff.config import BEV_MAP_CLASSES, NUSCENES_CAMERAS
from densediff.data.bev import collate_bev, rasterize_map
from densediff.data.worlds.bev_dataset import GeneratedBEVDataset
from densediff.data.worlds.raycast import (
    camera_rays,
    camera_rig,
    lidar_points,
    project_points,
    render_cameras,
)
from densediff.data.worlds.roads import (
    ASPHALT,
    CONCRETE,
    DIRT,
    GRASS,
    LOT,
    WHITE,
    YELLOW,
    Box,
    World,
    sample_world,
    world_extent,
)
from densediff.tasks import load_config
from densediff.utils.grid import BEVGrid, output_grid

SIZE = (64, 176)
OVERRIDES = ["task=bev", "data.dataset=generated", "model.aux_head.enabled=false",
             "data.bev.xbound=[-25,25,0.5]", "data.bev.ybound=[-25,25,0.5]",
             "data.bev.gen_image_size=[64,176]", "data.bev.image_size=[64,176]",
             "data.bev.test_resize=1.0", "data.bev.resize_range=[0.95,1.1]"]


def _data(*extra: str):
    return load_config(None, OVERRIDES + list(extra)).data


def _project(p: np.ndarray, k: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """Independent pinhole projection of ego points (N x 3) -> pixels (N x 2)."""
    cam = np.linalg.inv(pose) @ np.concatenate([p, np.ones((len(p), 1))], 1).T
    uvw = k @ cam[:3]
    return (uvw[:2] / uvw[2]).T


# ------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("jitter", [False, True])
def test_pixel_ray_hits_ground_where_it_projects(jitter):
    rng = np.random.default_rng(1) if jitter else None
    intr, poses = camera_rig(SIZE, rng)
    assert intr.shape == (6, 3, 3) and poses.shape == (6, 4, 4)
    rows, cols = np.meshgrid([40, 50, 63], [0, 37, 88, 175], indexing="ij")
    for k, pose in zip(intr, poses):
        r = pose[:3, :3]
        assert np.allclose(r.T @ r, np.eye(3), atol=1e-9) and np.isclose(np.linalg.det(r), 1.0)
        assert np.isclose(k[0, 0], k[1, 1]) and np.allclose(k[:2, 2], (SIZE[1] / 2, SIZE[0] / 2))
        origin, d = camera_rays(k, pose, SIZE)
        dirs = d[rows.ravel(), cols.ravel()]
        assert (dirs[:, 2] < 0).all()  # the lower image rows look down at the ground
        hits = origin + (-origin[2] / dirs[:, 2])[:, None] * dirs
        assert np.allclose(hits[:, 2], 0.0)
        expected = np.stack([cols.ravel() + 0.5, rows.ravel() + 0.5], 1)
        assert np.allclose(_project(hits, k, pose), expected, atol=1e-6)
        uv, depth = project_points(hits, k, pose)
        assert np.allclose(uv, expected, atol=1e-6) and (depth > 0).all()
        # 2 x 2 sub-pixel rays are centred on the pixel
        _, d2 = camera_rays(k, pose, SIZE, supersample=2)
        sub = d2[2 * 50:2 * 50 + 2, 2 * 88:2 * 88 + 2].reshape(4, 3).mean(0)
        assert np.allclose(sub, d[50, 88], atol=1e-9)


def test_known_ground_point_front_not_back():
    intr, poses = camera_rig(SIZE)
    cam = {name: (intr[i], poses[i]) for i, name in enumerate(NUSCENES_CAMERAS)}

    def pixel(point, name):
        uv, depth = project_points(np.array([point], float), *cam[name])
        return uv[0, 0], uv[0, 1], depth[0]

    u, v, depth = pixel([8.0, 0.0, 0.0], "CAM_FRONT")
    horizon = SIZE[0] / 2 - intr[1, 1, 1] * np.tan(np.radians(3.0))  # nominal 3 degrees down
    assert depth > 0 and abs(u - SIZE[1] / 2) < 1.0 and horizon < v < SIZE[0]
    assert pixel([8.0, 0.0, 0.0], "CAM_BACK")[2] < 0  # behind the back camera
    u, v, depth = pixel([-8.0, 0.0, 0.0], "CAM_BACK")
    assert depth > 0 and abs(u - SIZE[1] / 2) < 1.0 and horizon < v < SIZE[0]
    # positive yaw is left: a point ahead-left is in CAM_FRONT_LEFT, left of CAM_FRONT_RIGHT
    u, v, depth = pixel([6.0, 6.0, 0.0], "CAM_FRONT_LEFT")
    assert depth > 0 and 0 <= u < SIZE[1] and 0 <= v < SIZE[0]
    u, _, depth = pixel([10.0, 2.0, 0.0], "CAM_FRONT_RIGHT")
    assert depth > 0 and u < 0
    assert pixel([0.0, -8.0, 0.0], "CAM_BACK_RIGHT")[2] > 0


def test_rig_honours_camera_names():
    intr, poses = camera_rig(SIZE)
    sub_k, sub_p = camera_rig(SIZE, None, ["CAM_BACK", "CAM_FRONT"])
    order = [NUSCENES_CAMERAS.index("CAM_BACK"), NUSCENES_CAMERAS.index("CAM_FRONT")]
    assert np.allclose(sub_k, intr[order]) and np.allclose(sub_p, poses[order])
    assert intr[order[0], 0, 0] < 0.6 * intr[order[1], 0, 0]  # the back camera is wide-angle
    jit_k, jit_p = camera_rig(SIZE, np.random.default_rng(0))
    assert not np.allclose(jit_p, poses) and np.abs(jit_p[:, :3, 3] - poses[:, :3, 3]).max() < 0.11
    with pytest.raises(ValueError, match="unknown camera"):
        camera_rig(SIZE, None, ["CAM_TOP"])


# ------------------------------------------------------------------------------- rendering


def _hand_world(boxes: list[Box] | None = None) -> World:
    """Grass everywhere, a red 'asphalt' rectangle x in [4, 30], y in [-4, 4]; flat colours."""
    res = 0.1
    n = 1200
    mat = np.full((n, n), GRASS, np.uint8)
    x = -60 + (np.arange(n) + 0.5) * res
    mat[np.ix_((x > 4) & (x < 30), (x > -4) & (x < 4))] = ASPHALT
    palette = np.zeros((7, 3))
    palette[GRASS], palette[ASPHALT] = (40, 160, 40), (200, 40, 40)
    return World(mat, (-60.0, -60.0), res, palette, boxes=boxes or [])


def test_rendered_colour_matches_the_ground_the_ray_hits():
    world = _hand_world()
    intr, poses = camera_rig(SIZE)
    images = render_cameras(world, intr, poses, SIZE)
    noisy = render_cameras(world, intr, poses, SIZE, rng=np.random.default_rng(0), noise=3.0)
    n_in = n_out = 0
    for img, img_n, k, pose in zip(images, noisy, intr, poses):
        origin, d = camera_rays(k, pose, SIZE, supersample=2)
        with np.errstate(divide="ignore"):
            t = np.where(d[..., 2] < 0, -origin[2] / d[..., 2], np.inf)
        p = origin + np.where(np.isfinite(t), t, 0)[..., None] * d
        inside = (p[..., 0] > 4) & (p[..., 0] < 30) & (np.abs(p[..., 1]) < 4) & np.isfinite(t)
        outside = ~inside & np.isfinite(t)
        block = lambda m: m.reshape(SIZE[0], 2, SIZE[1], 2).all((1, 3))  # all 4 sub-rays
        all_in, all_out = block(inside), block(outside)
        sky = block(~np.isfinite(t))
        assert np.abs(img[all_in].astype(int) - (200, 40, 40)).max(initial=0) <= 1
        assert np.abs(img[all_out].astype(int) - (40, 160, 40)).max(initial=0) <= 1
        assert (img[sky][:, 2] > img[sky][:, 0]).all()  # blue-ish sky
        if all_in.any():
            err = np.abs(img_n[all_in].astype(float) - (200, 40, 40)).mean()
            assert 1.0 < err < 5.0  # noise is there, and small
        n_in, n_out = n_in + all_in.sum(), n_out + all_out.sum()
    assert n_in > 200 and n_out > 2000


def test_boxes_occlude_cameras_and_lidar():
    box = Box(np.array([15.0, 0.0]), np.array([2.0, 2.0, 3.0]), 0.0, np.array([20.0, 20.0, 220.0]),
              "car", 50.0)
    world = _hand_world([box])
    intr, poses = camera_rig(SIZE)
    front = NUSCENES_CAMERAS.index("CAM_FRONT")
    img = render_cameras(world, intr[front:front + 1], poses[front:front + 1], SIZE)[0]
    # the box face and the ground hidden behind it show the box, not the red asphalt
    def colour_at(point):
        uv, _ = project_points(np.array([point]), intr[front], poses[front])
        return img[int(uv[0, 1]), int(uv[0, 0])].astype(int)

    for target in ([14.0, 0.0, 1.2], [20.0, 0.0, 0.0]):
        r, g, b = colour_at(target)
        assert b > 2 * r and b > 2 * g, (target, (r, g, b))
    assert colour_at([10.0, 0.0, 0.0])[0] > 150  # the asphalt in front of the box is visible
    pts = lidar_points(world, np.random.default_rng(0))
    on_box = pts[pts[:, 2] > 0.2]
    assert len(on_box) > 20
    assert (on_box[:, 0] > 13.95).all() and (on_box[:, 0] < 16.05).all()
    assert (np.abs(on_box[:, 1]) < 1.05).all() and (on_box[:, 2] < 3.05).all()
    shadow = (pts[:, 0] > 17) & (pts[:, 0] < 30) & (np.abs(pts[:, 1]) < 0.5)
    assert not shadow.any()


# ------------------------------------------------------------------------------- LiDAR


def test_lidar_ground_points_and_intensity():
    paint, asphalt = [], []
    for i in range(4):
        rng = np.random.default_rng([7, i])
        world = sample_world(rng, 25.0, obstacles=False)
        pts = lidar_points(world, rng)
        assert pts.dtype == np.float32 and pts.shape[1] == 5 and len(pts) > 5000
        assert np.abs(pts[:, 2]).max() < 0.05  # no obstacles: every return is on the ground
        rng_xyz = np.linalg.norm(pts[:, :3] - np.array([0.95, 0.0, 1.84]), axis=1)
        assert rng_xyz.max() < 50.1 and rng_xyz.min() > 3.0
        assert (pts[:, 3] >= 0).all() and (pts[:, 3] <= 255).all() and (pts[:, 4] == 0).all()
        mat = world.material_at(pts[:, 0], pts[:, 1])
        paint.append(pts[np.isin(mat, (WHITE, YELLOW)), 3])
        asphalt.append(pts[mat == ASPHALT, 3])
    paint, asphalt = np.concatenate(paint), np.concatenate(asphalt)
    assert len(paint) > 50 and len(asphalt) > 1000
    assert paint.mean() > 3 * asphalt.mean()


# ------------------------------------------------------------------------------- worlds and dataset


def test_worlds_deterministic_and_labels_plausible():
    data = _data()
    ds = GeneratedBEVDataset(data, "val", train=False)
    a, b = ds[0], GeneratedBEVDataset(data, "val", train=False)[0]
    assert torch.equal(a["image"]["images"], b["image"]["images"])
    assert torch.equal(a["label"], b["label"])
    assert torch.equal(a["image"]["cam2ego"], b["image"]["cam2ego"])
    c = ds[1]
    assert not torch.equal(a["image"]["images"], c["image"]["images"])
    assert not torch.equal(a["label"], c["label"])
    other = GeneratedBEVDataset(data.model_copy(update={"gen_seed": 5}), "val", False)[0]
    assert not torch.equal(a["label"], other["label"])

    grid = output_grid(data.bev)
    classes = list(BEV_MAP_CLASSES)
    world = ds.world(0)
    assert set(world.geometry().polygons) | set(world.geometry().lines) <= set(classes)
    assert min(world.material.shape) * world.res >= 2 * (1.5 * world_extent(data.bev) + 20)
    labels = np.stack([rasterize_map(ds.world(i).geometry(), grid, classes) for i in range(20)])
    present = labels.reshape(20, 6, -1).max(-1)  # scene x class
    freq = labels.reshape(20, 6, -1).mean(-1)
    assert present.sum(0).min() >= 2, dict(zip(classes, present.sum(0)))
    ego = np.floor((np.zeros(2) - grid.low) / grid.step).astype(int)
    assert labels[:, 0, ego[0], ego[1]].all()  # the ego always drives on a road
    drivable = freq[:, 0]
    assert (drivable > 0.05).all() and (drivable < 0.95).all() and 0.15 < drivable.mean() < 0.7
    for k in range(1, 6):  # the other classes are smaller than the drivable area
        assert freq[:, k].mean() < 0.5 * drivable.mean()
    on_road = lambda k: (labels[:, k] & labels[:, 0]).sum() / max(1, labels[:, k].sum())
    # crossings, stop lines, dividers and car parks are drivable (up to rasterised edges) ...
    assert on_road(1) > 0.95 and on_road(3) > 0.9 and on_road(4) == 1.0 and on_road(5) > 0.99
    assert on_road(2) < 0.15  # ... walkways are beside the road


def test_paint_agrees_with_the_map():
    """The rendered paint (material raster) matches the map classes cell by cell."""
    grid = BEVGrid((-25.0, 25.0, 0.25), (-25.0, 25.0, 0.25))
    xs, ys = grid.centres()
    gx, gy = np.meshgrid(xs, ys, indexing="ij")
    share = {k: [] for k in ("road", "walk", "lot", "zebra", "grass", "divider", "plain")}
    for i in range(6):
        world = sample_world(np.random.default_rng([11, i]), 25.0)
        lab = rasterize_map(world.geometry(), grid, list(BEV_MAP_CLASSES)).astype(bool)
        mat = world.material_at(gx, gy)
        paint = np.isin(mat, (WHITE, YELLOW))
        drive, crossing, walk, stop, lot, divider = lab
        road = drive & ~lot
        share["road"].append(np.isin(mat[road], (ASPHALT, WHITE, YELLOW)).mean())
        share["plain"].append(paint[road & ~crossing & ~stop & ~divider].mean())
        if walk.any():
            share["walk"].append((mat[walk & ~drive] == CONCRETE).mean())
        if lot.any():
            share["lot"].append(np.isin(mat[lot], (LOT, WHITE, ASPHALT)).mean())
        if crossing.any():
            share["zebra"].append(paint[crossing].mean())
        if divider.any():
            share["divider"].append(paint[divider & ~crossing].mean())
        share["grass"].append(np.isin(mat[~drive & ~walk], (GRASS, DIRT)).mean())
    mean = {k: float(np.mean(v)) for k, v in share.items()}
    assert mean["road"] > 0.97 and mean["walk"] > 0.9 and mean["lot"] > 0.97, mean
    assert mean["grass"] > 0.97 and 0.25 < mean["zebra"] < 0.8, mean
    assert mean["divider"] > 2 * mean["plain"] and mean["plain"] < 0.1, mean


def test_paint_is_the_labels_on_the_material_grid():
    """The material raster and the labels use one rule (a cell takes a polygon when its centre
    is inside) on one cell convention (cell [ix, iy] covers [ox + ix res, ox + (ix + 1) res),
    as World.material_at reads it): rasterised on the material's own 0.1 m grid, the drivable
    area is exactly the asphalt, car-park and paint cells and the walkways off it exactly the
    concrete ones."""
    for i in range(3):
        world = sample_world(np.random.default_rng([11, i]), 25.0)
        n, (ox, oy), res = world.material.shape[0], world.origin, world.res
        grid = BEVGrid((ox, ox + n * res, res), (oy, oy + n * res, res))
        drive, walk = rasterize_map(world.geometry(), grid, ["drivable_area", "walkway"]).astype(bool)
        np.testing.assert_array_equal(np.isin(world.material, (ASPHALT, LOT, WHITE, YELLOW)), drive)
        np.testing.assert_array_equal(world.material == CONCRETE, walk & ~drive)
        xs, ys = grid.centres()  # material_at reads the same cells
        np.testing.assert_array_equal(world.material_at(*np.meshgrid(xs, ys, indexing="ij")),
                                      world.material)


def test_dataset_end_to_end():
    data = _data()
    ds = GeneratedBEVDataset(data, "train", train=True)
    assert len(ds) == data.gen_num_train
    s = ds[0]
    n = len(data.bev.cameras)
    assert s["image"]["images"].shape == (n, 3, 64, 176)
    assert s["image"]["intrinsics"].shape == (n, 3, 3) and s["image"]["cam2ego"].shape == (n, 4, 4)
    assert s["label"].shape == (6, 100, 100) and s["label"].dtype == torch.uint8
    assert set(s["label"].unique().tolist()) <= {0, 1} and s["label"][0].any()
    assert s["meta"]["name"] == "generated/train/00000" and "points" not in s["image"]
    rec = ds.load(0)
    assert [im.size for im in rec.images] == [(176, 64)] * n and rec.points is None

    lidar = _data("data.bev.lidar=true", "data.bev.cameras=[CAM_BACK,CAM_FRONT]")
    ds2 = GeneratedBEVDataset(lidar, "test", train=False)
    batch = collate_bev([ds2[0], ds2[1]])
    assert batch["image"]["images"].shape == (2, 2, 3, 64, 176)
    pts, mask = batch["image"]["points"], batch["image"]["points_mask"]
    assert pts.shape[0] == 2 and pts.shape[2] == 5 and mask.sum() > 5000
    k, _ = camera_rig((64, 176), None, ["CAM_BACK", "CAM_FRONT"])
    assert torch.allclose(batch["image"]["intrinsics"][0, :, 0, 0],
                          torch.tensor(k[:, 0, 0], dtype=torch.float32), rtol=0.05)
