"""The nuScenes fixture (write_nuscenes) against the official nuscenes-devkit: the devkit opens
it, reads the same poses, calibration, sensor order and LiDAR sweeps as our loader, and its
map raster (``NuScenesMap.get_map_mask``, BEVFusion's labels) agrees with ours.

Skipped without the devkit, except under ``DENSEDIFF_REQUIRE_DEVKIT=1``: CI runs this module
with ``make test-devkit``, in a venv of its own (the devkit pins numpy < 2).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

if os.environ.get("DENSEDIFF_REQUIRE_DEVKIT"):  # CI (`make test-devkit`): never skip
    import nuscenes
else:
    nuscenes = pytest.importorskip("nuscenes")

import cv2  # noqa: E402  (a dependency of the devkit)
from nuscenes.map_expansion.map_api import NuScenesMap  # noqa: E402
from nuscenes.nuscenes import NuScenes  # noqa: E402
from nuscenes.utils.data_classes import LidarPointCloud  # noqa: E402
from nuscenes.utils.geometry_utils import transform_matrix  # noqa: E402
from pyquaternion import Quaternion  # noqa: E402

from densediff.data.bev import DIVIDER_WIDTH, MapGeometry, rasterize_map  # noqa: E402
from densediff.data.nuscenes import (  # noqa: E402
    NuScenesDataset,
    devkit_label_pairs,
    devkit_map_labels,
    remove_close,
)
from densediff.errors import DataError  # noqa: E402
from densediff.tasks import load_config  # noqa: E402
from densediff.testing.fixtures import write_nuscenes  # noqa: E402
from densediff.utils.grid import BEVGrid, output_grid  # noqa: E402

SWEEPS = 2
POLYGON_CLASSES = ("drivable_area", "ped_crossing", "walkway", "stop_line", "carpark_area")


def _cfg(*extra):
    return load_config(None, ["task=bev", "data.dataset=nuscenes", "model.aux_head.enabled=false",
                              "data.bev.image_size=[64,96]", "data.bev.version=v1.0-mini",
                              *extra]).data


@pytest.fixture(scope="module")
def nusc(tmp_path_factory):
    info = write_nuscenes(tmp_path_factory.mktemp("devkit") / "nuscenes", sweeps_per_sample=SWEEPS)
    return info, NuScenes(info["version"], str(info["root"]), verbose=False)


def _samples(devkit: NuScenes, scene: dict) -> list[str]:
    """The devkit's sample tokens of a scene, following ``next``."""
    out, token = [], scene["first_sample_token"]
    while token:
        out.append(token)
        token = devkit.get("sample", token)["next"]
    return out


def test_devkit_opens_the_fixture(nusc):
    info, devkit = nusc
    assert len(devkit.scene) == len(info["scenes"]) and len(devkit.sample) == len(info["samples"])
    assert {r["name"] for r in devkit.category} >= {"vehicle.car"}
    for s in devkit.sample:  # every key frame reverse-indexed, one annotated car
        assert set(s["data"]) == set(info["cameras"]) | {"LIDAR_TOP"} and len(s["anns"]) == 1
    box = devkit.get_boxes(devkit.sample[0]["data"]["LIDAR_TOP"])[0]
    assert box.name == "vehicle.car"
    for log in devkit.log:  # log -> map record with an existing semantic-prior file
        rec = devkit.get("map", log["map_token"])
        assert (info["root"] / rec["filename"]).is_file() and log["token"] in rec["log_tokens"]
    for loc in info["locations"]:
        m = NuScenesMap(str(info["root"]), loc)
        assert len(m.drivable_area) == 2 and len(m.lane) == 1
        assert [c["token"] for c in m.stop_line[0]["cue"]] == [m.ped_crossing[0]["token"]]
        lane = m.lane[0]
        assert len(lane["left_lane_divider_segment_nodes"]) == 2
        # the lane's arcline path runs along its centre, with the scene's first heading
        path = m.discretize_lanes([lane["token"]], 1.0)[lane["token"]]
        assert len(path) == 11 and m.get_closest_lane(*np.mean(path, 0)[:2], radius=2) == lane["token"]


def test_tables_agree_with_our_loader(nusc):
    info, devkit = nusc
    data = _cfg("data.bev.cameras=[CAM_BACK,CAM_FRONT_LEFT,CAM_FRONT,CAM_BACK_RIGHT]")
    cams = list(data.bev.cameras)
    for split in ("train", "val"):
        ds = NuScenesDataset(data, info["root"], split, train=False)
        scenes = [sc for sc in devkit.scene if sc["name"] in info["splits"][split]]
        assert ds.samples == [t for sc in scenes for t in _samples(devkit, sc)]  # same order
        for i, token in enumerate(ds.samples):
            rec, sample = ds.load(i), devkit.get("sample", token)
            for j, ch in enumerate(cams):  # sensor order: data.bev.cameras
                sd = devkit.get("sample_data", sample["data"][ch])
                assert sd["channel"] == ch and rec.paths[j] == str(info["root"] / sd["filename"])
                cs = devkit.get("calibrated_sensor", sd["calibrated_sensor_token"])
                np.testing.assert_allclose(rec.intrinsics[j], cs["camera_intrinsic"], atol=1e-12)
                np.testing.assert_allclose(
                    rec.cam2ego[j], transform_matrix(cs["translation"], Quaternion(cs["rotation"])),
                    atol=1e-9)
            key = ds.tables.key_frame(token, "LIDAR_TOP")
            assert key["token"] == sample["data"]["LIDAR_TOP"]
            pose = devkit.get("ego_pose", key["ego_pose_token"])
            np.testing.assert_allclose(
                ds.tables.pose("ego_pose", ds.tables.get("ego_pose", key["ego_pose_token"])),
                transform_matrix(pose["translation"], Quaternion(pose["rotation"])), atol=1e-9)


@pytest.mark.parametrize("sweeps", [SWEEPS, SWEEPS + 3])  # + 3: back through the previous key frame
def test_points_agree_with_from_file_multisweep(nusc, sweeps):
    """Our points (ego frame) = the devkit's (key LiDAR frame) moved by lidar2ego, sweep by sweep
    in the same order and with the same time lags; the devkit also drops the key frame's close
    points (min_distance), which we keep (BEVFusion filters the sweeps only)."""
    info, devkit = nusc
    ds = NuScenesDataset(_cfg("data.bev.lidar=true", f"data.bev.lidar_sweeps={sweeps}"),
                         info["root"], "val", train=False)
    for i, token in enumerate(ds.samples):
        ours = ds.load(i).points.astype(np.float64)
        sample = devkit.get("sample", token)
        pc, times = LidarPointCloud.from_file_multisweep(devkit, sample, "LIDAR_TOP", "LIDAR_TOP",
                                                         nsweeps=sweeps + 1, min_distance=1.0)
        key = devkit.get("sample_data", sample["data"]["LIDAR_TOP"])
        cs = devkit.get("calibrated_sensor", key["calibrated_sensor_token"])
        lidar2ego = transform_matrix(cs["translation"], Quaternion(cs["rotation"]))
        theirs = pc.points[:3].T.astype(np.float64) @ lidar2ego[:3, :3].T + lidar2ego[:3, 3]
        # drop our key frame's close points (in the sensor frame)
        sensor = (ours[:, :3] - lidar2ego[:3, 3]) @ lidar2ego[:3, :3]
        key_rows = ours[:, 4] == 0
        close = key_rows & ~np.isin(np.arange(len(ours)),
                                    np.flatnonzero(key_rows)[_kept(sensor[key_rows])])
        ours = ours[~close]
        assert close.sum() == 2 and len(ours) == pc.nbr_points()
        np.testing.assert_allclose(ours[:, :3], theirs, rtol=0, atol=1e-5)
        np.testing.assert_allclose(ours[:, 3], pc.points[3], rtol=0, atol=0)  # intensity
        np.testing.assert_allclose(ours[:, 4], times[0], rtol=0, atol=1e-6)
        assert len(np.unique(times)) == min(sweeps + 1, 1 + (SWEEPS + 1) * i + SWEEPS)


def _kept(points: np.ndarray) -> np.ndarray:
    """Indices of the points that remove_close keeps."""
    idx = np.arange(len(points), dtype=np.float64)
    return remove_close(np.column_stack([points, idx]))[:, -1].astype(int)


def _dilate_up(mask: np.ndarray) -> np.ndarray:
    """The mask grown by one cell towards +x and +y (a 2 x 2 structuring element)."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:, 1:] |= out[:, :-1].copy()
    return out


def _centroid(mask: np.ndarray, grid: BEVGrid) -> np.ndarray:
    xs, ys = grid.centres()
    ix, iy = np.nonzero(mask)
    return np.array([xs[ix].mean(), ys[iy].mean()])


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.mark.parametrize("ybound", [(-50.0, 50.0, 0.5), (-30.0, 30.0, 0.5)])  # square; X != Y
def test_map_labels_agree_with_get_map_mask(nusc, ybound):
    """Our labels (map shapes moved into the ego frame by the LIDAR_TOP ego pose, rasterised on
    BEVGrid) against the devkit's ``get_map_mask`` of the same patch (pose by the devkit).

    What to expect. Lines: the devkit truncates vertices to whole pixels and draws 3 pixels
    wide about them, which is our band wherever a line is not exactly on a cell edge (there the
    devkit is one row higher): IoU ~0.7-0.9, centroids within 0.25 m. Polygons: ``cv2.fillPoly``
    on rounded vertices sets one more column and row towards +x and +y than the cells whose
    centre is inside, i.e. the devkit's labels, read on BEVGrid, are a cell larger and 0.25 m
    towards +x and +y; for a rectangle of a x b cells the IoU is ab / ((a + 1)(b + 1)): 0.79
    for the 4 x 4 m (8 x 8 cells) fixture shapes, 0.87 for the 6 x 8 m car park. Hence the
    bounds: every layer of every sample IoU >= 0.65 (with a rotation, flip, swapped axis or a
    half-cell shift of ours, such as the old Pillow "-0.5" one, layers fall below: a shift of
    the 8 x 8 squares by one cell gives 0.51); polygons against ours grown by that one cell (+x,
    +y) IoU >= 0.75 (1 for the axis-aligned rectangles of each scene's first sample), and the
    mean centroid offset 0.25 +- 0.1 m in x and in y. Shapes cut by the grid's edge to a few
    cells are only checked to be small in both.
    """
    info, devkit = nusc
    data = _cfg(f"data.bev.ybound=[{ybound[0]},{ybound[1]},{ybound[2]}]")
    grid = output_grid(data.bev)
    classes = list(data.bev.classes)
    assert classes == [*POLYGON_CLASSES, "divider"]
    offsets = {c: [] for c in classes}
    for _, token, ours, theirs in devkit_label_pairs(data, info["root"], devkit):
        assert theirs.shape == ours.shape == (len(classes), *grid.shape)
        first = info["samples"][token]["index"] == 0
        for k, c in enumerate(classes):
            assert ours[k].any() and theirs[k].any(), (token, c)
            if ours[k].sum() < 20:  # a corner of a shape cut by the grid's edge
                assert theirs[k].sum() < 40, (token, c)
                continue
            assert _iou(ours[k], theirs[k]) >= 0.65, (token, c, _iou(ours[k], theirs[k]))
            offsets[c].append(_centroid(theirs[k], grid) - _centroid(ours[k], grid))
            if c in POLYGON_CLASSES:
                iou = _iou(_dilate_up(ours[k]), theirs[k])
                assert iou >= 0.75, (token, c, iou)
                if first and c != "drivable_area":  # its hole is grown by the devkit too
                    assert iou == 1.0, (token, c, iou)
    for c in classes:
        off = np.mean(offsets[c], 0)
        if c in POLYGON_CLASSES:
            assert (abs(off - 0.25) <= 0.1).all(), (c, off)
        else:
            assert (abs(off) <= 0.25).all(), (c, off)


def test_devkit_map_labels_rejects_layers_it_cannot_draw(nusc):
    info, _ = nusc
    m = NuScenesMap(str(info["root"]), info["locations"][0])
    grid = BEVGrid((-10.0, 10.0, 0.5), (-10.0, 10.0, 0.5))
    with pytest.raises(DataError) as e:
        devkit_map_labels(m, (0.0, 0.0), 0.0, grid, ["drivable_area", "traffic_light"])
    assert "\n" not in str(e.value) and "'traffic_light'" in str(e.value)


def test_divider_width_is_the_devkits():
    """``cv2.polylines(..., thickness=2)`` (the devkit's lines) covers 3 pixels across an
    axis-aligned line and ~2.94 on average over directions: 1.5 m at 0.5 m, DIVIDER_WIDTH. Our
    lines cover the same ground per metre of line."""
    rng = np.random.default_rng(0)
    grid = BEVGrid((-50.0, 50.0, 0.5), (-50.0, 50.0, 0.5))
    cv_width, our_width = [], []
    for a in rng.uniform(0, np.pi, 200):
        d = np.array([math.cos(a), math.sin(a)])
        c = rng.uniform(90, 110, 2)
        area = []
        for length in (30.0, 90.0):  # the difference cancels the caps
            p, q = (c - d * length / 2).astype(np.int32), (c + d * length / 2).astype(np.int32)
            mask = np.zeros((200, 200), np.uint8)
            cv2.polylines(mask, [np.stack([p, q])], False, 1, 2)
            area.append((int(mask.sum()), float(np.hypot(*(q - p)))))
        cv_width.append((area[1][0] - area[0][0]) / (area[1][1] - area[0][1]))
        line = np.stack([-d, d]) * 30.0 + rng.uniform(-1, 1, 2)
        ours = rasterize_map(MapGeometry(lines={"d": [line]}), grid, ["d"])[0]
        our_width.append((ours.sum() * 0.25 - math.pi * (DIVIDER_WIDTH / 2) ** 2) / 60.0 / 0.5)
    mask = np.zeros((40, 40), np.uint8)
    cv2.polylines(mask, [np.array([[5, 20], [35, 20]], np.int32)], False, 1, 2)
    assert np.flatnonzero(mask.any(1)).tolist() == [19, 20, 21]  # 3 pixels across
    assert abs(np.mean(cv_width) - 2.94) < 0.05, np.mean(cv_width)
    assert DIVIDER_WIDTH == 3 * 0.5
    assert abs(np.mean(our_width) - np.mean(cv_width)) < 0.1, (np.mean(our_width), np.mean(cv_width))
