"""nuScenes loader (densediff.data.nuscenes) on the tiny real-format fixture (write_nuscenes)."""

import json
import math
import sys
import types

import numpy as np
import pytest
import torch

from densediff.data.bev import collate_bev
from densediff.data.nuscenes import (
    NuScenesDataset,
    check_nuscenes,
    pose_matrix,
    quaternion_matrix,
    read_table,
    remove_close,
)
from densediff.errors import DataError
from densediff.tasks import load_config
from densediff.testing.fixtures import (
    NUSCENES_CAMERA_COLOURS,
    NUSCENES_CLOSE_POINTS,
    NUSCENES_LIDAR,
    NUSCENES_POINT_MARKER,
    write_nuscenes,
)

SWEEPS = 2


def _cfg(*extra):
    return load_config(None, ["task=bev", "data.dataset=nuscenes", "model.aux_head.enabled=false",
                              "data.bev.image_size=[64,96]", "data.bev.version=v1.0-mini",
                              *extra]).data


@pytest.fixture
def nusc(tmp_path):
    return write_nuscenes(tmp_path / "nuscenes", sweeps_per_sample=SWEEPS)


def _one_line_error(excinfo, *parts):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for p in parts:
        assert p in msg, msg
    return msg


# ------------------------------------------------------------------------------------ geometry


def test_quaternion_matrix_conventions():
    h = math.radians(90) / 2
    r = quaternion_matrix(math.cos(h), 0, 0, math.sin(h))  # yaw +90 deg: x -> y
    np.testing.assert_allclose(r @ [1, 0, 0], [0, 1, 0], atol=1e-12)
    np.testing.assert_allclose(r @ [0, 1, 0], [-1, 0, 0], atol=1e-12)
    # nuScenes' forward camera quaternion: camera z (forward) -> ego x, camera x (right) -> -y
    r = quaternion_matrix(0.5, -0.5, 0.5, -0.5)
    np.testing.assert_allclose(r @ [0, 0, 1], [1, 0, 0], atol=1e-12)
    np.testing.assert_allclose(r @ [1, 0, 0], [0, -1, 0], atol=1e-12)
    np.testing.assert_allclose(r @ [0, 1, 0], [0, 0, -1], atol=1e-12)
    np.testing.assert_allclose(quaternion_matrix(2, 0, 0, 0), np.eye(3))  # normalised
    m = pose_matrix([1, 2, 3], [math.cos(h), 0, 0, math.sin(h)])
    np.testing.assert_allclose(m @ [1, 0, 0, 1], [1, 3, 3, 1], atol=1e-12)
    with pytest.raises(ValueError):
        quaternion_matrix(0, 0, 0, 0)


def test_remove_close_is_a_box_in_x_and_y():
    pts = np.array([[0.5, 0.5, 9, 0, 0], [0.5, 1.5, 0, 0, 0], [-1.2, 0.1, 0, 0, 0],
                    [-0.9, -0.9, -5, 0, 0]], np.float32)
    np.testing.assert_array_equal(remove_close(pts), pts[[1, 2]])


# ------------------------------------------------------------------------------------ tables


def test_cameras_joined_in_config_order(nusc):
    data = _cfg("data.bev.cameras=[CAM_BACK,CAM_FRONT_LEFT,CAM_FRONT]")
    cams = list(data.bev.cameras)
    for split in ("train", "val"):
        ds = NuScenesDataset(data, nusc["root"], split, train=False)
        for i, token in enumerate(ds.samples):
            rec = ds.load(i)
            info = nusc["samples"][token]
            assert rec.name == token
            assert rec.paths == [str(nusc["root"] / info["camera_files"][c]) for c in cams]
            # key frames (coloured), not the grey non-key frames of the same sample
            for img, c in zip(rec.images, cams):
                assert img.size == (160, 90)
                mean = np.asarray(img, np.float64).reshape(-1, 3).mean(0)
                np.testing.assert_allclose(mean, NUSCENES_CAMERA_COLOURS[c], atol=4)
            np.testing.assert_allclose(rec.intrinsics, [nusc["intrinsics"][c] for c in cams])
            # per-scene calibration rows; the rotation built from yaws, not from quaternions
            np.testing.assert_allclose(rec.cam2ego, [nusc["cam2ego"][info["scene"]][c] for c in cams],
                                       atol=1e-9)
            assert rec.points is None


def test_camera_axes_point_along_their_rigs(nusc):
    ds = NuScenesDataset(_cfg(), nusc["root"], "train", train=False)
    c2e = ds.load(0).cam2ego
    yaws = [math.degrees(math.atan2(m[1, 2], m[0, 2])) for m in c2e]  # optical axis (camera z)
    np.testing.assert_allclose(yaws, [55, 0, -55, 110, 180, -110], atol=1e-6)
    assert np.all(c2e[:, 2, 1] < -0.99)  # image down = ego down
    assert np.all((c2e[:, 2, 3] > 1.4) & (c2e[:, 2, 3] < 1.7))


def test_sample_order_and_splits(nusc, monkeypatch):
    root = nusc["root"]
    s0, s1 = nusc["scenes"]
    train = NuScenesDataset(_cfg(), root, "train", train=False)
    assert train.samples == s0["samples"] and len(train) == 3  # shuffled table, time order
    assert train.skipped == 1 and "1 scenes of the split not found" in repr(train)
    val = NuScenesDataset(_cfg(), root, "val", train=False)
    assert val.samples == s1["samples"] and val.skipped == 0
    times = [nusc["samples"][t]["timestamp"] for t in val.samples]
    assert times == sorted(times)
    # scenes follow the scene table, not the split file
    (root / "splits" / "both.txt").write_text(f"# comment\n{s1['name']}\n\n{s0['name']}\n")
    both = NuScenesDataset(_cfg(), root, "both", train=False)
    assert both.samples == s0["samples"] + s1["samples"]
    # no split file: nuscenes-devkit's lists
    fake = types.ModuleType("nuscenes.utils.splits")
    fake.create_splits_scenes = lambda: {"mini_val": [s1["name"], "scene-0553"], "train": []}
    for name in ("nuscenes", "nuscenes.utils"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "nuscenes.utils.splits", fake)
    dev = NuScenesDataset(_cfg(), root, "mini_val", train=False)
    assert dev.samples == s1["samples"] and dev.skipped == 1
    with pytest.raises(DataError) as e:
        NuScenesDataset(_cfg(), root, "train_detect", train=False)
    _one_line_error(e, "train_detect.txt", "has no split 'train_detect'", "mini_val")
    with pytest.raises(DataError) as e:
        NuScenesDataset(_cfg(), root, "train", train=False) if False else \
            NuScenesDataset(_cfg(), root, "empty", train=False)
    (root / "splits" / "empty.txt").write_text("scene-9999\n")
    with pytest.raises(DataError) as e:
        NuScenesDataset(_cfg(), root, "empty", train=False)
    _one_line_error(e, "no samples in split 'empty'", "1 scenes")


def test_fixture_has_what_the_devkit_reads(nusc):
    """write_nuscenes writes every table and map field nuscenes-devkit's constructors read
    (tests/test_nuscenes_devkit.py opens it with the devkit, when installed)."""
    root, v = nusc["root"], nusc["root"] / "v1.0-mini"
    tables = {t: json.loads((v / f"{t}.json").read_text()) for t in (
        "category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor", "ego_pose",
        "log", "scene", "sample", "sample_data", "sample_annotation", "map")}
    logs = {r["token"] for r in tables["log"]}
    assert {t for r in tables["map"] for t in r["log_tokens"]} == logs
    assert all((root / r["filename"]).is_file() for r in tables["map"])
    instances = {r["token"] for r in tables["instance"]}
    samples = {r["token"] for r in tables["sample"]}
    assert all(a["instance_token"] in instances and a["sample_token"] in samples
               for a in tables["sample_annotation"])
    for loc in nusc["locations"]:
        m = json.loads((root / "maps" / "expansion" / f"{loc}.json").read_text())
        assert m["version"] == "1.3" and {"canvas_edge", "arcline_path_3", "connectivity"} <= m.keys()
        nodes = {n["token"] for n in m["node"]}
        assert all(r["stop_line_type"] == "PED_CROSSING" for r in m["stop_line"])
        for lane in m["lane"]:
            for side in ("left_lane_divider_segments", "right_lane_divider_segments"):
                assert lane[side] and all(seg["node_token"] in nodes for seg in lane[side])
            assert lane["token"] in m["arcline_path_3"] and lane["token"] in m["connectivity"]


# ------------------------------------------------------------------------------------ LiDAR


def _lidar(nusc, sweeps):
    data = _cfg("data.bev.lidar=true", f"data.bev.lidar_sweeps={sweeps}")
    return NuScenesDataset(data, nusc["root"], "train", train=False)


def test_sweeps_moved_into_the_key_ego_frame(nusc):
    ds = _lidar(nusc, SWEEPS)
    n, dt, speed = nusc["random_points"], nusc["sweep_dt_us"], nusc["speed"]
    lt = NUSCENES_LIDAR[1]
    for i in range(len(ds)):
        pts = ds.load(i).points
        assert pts.dtype == np.float32 and pts.shape == (3 + n + SWEEPS * (1 + n), 5)
        lags = np.round(pts[:, 4] * 1e6).astype(int)
        assert sorted(set(lags)) == [k * dt for k in range(SWEEPS + 1)]
        for k in range(SWEEPS + 1):
            sweep = pts[lags == k * dt]
            # close points kept in the key frame only
            assert len(sweep) == (3 + n if k == 0 else 1 + n)
            # marker: 10 m along the LiDAR's y axis = 10 m ahead of the car (yaw -90 deg mount),
            # seen from a car k sweeps back, which drove speed * dt metres per sweep
            np.testing.assert_allclose(sweep[0, :3], [lt[0] + 10 - k * speed * dt / 1e6, lt[1], lt[2]],
                                       atol=1e-4)
        key = pts[lags == 0]
        close = [(lt[0] + y, lt[1] - x, lt[2] + z) for x, y, z in NUSCENES_CLOSE_POINTS]
        np.testing.assert_allclose(key[1:3, :3], close, atol=1e-5)
        assert key[0, 3] == 255  # intensity kept


def test_sweeps_reach_back_through_earlier_key_frames(nusc):
    n = nusc["random_points"]
    ds = _lidar(nusc, SWEEPS + 3)
    # the first sample: the chain ends at the scene start
    assert len(ds.load(0).points) == 3 + n + SWEEPS * (1 + n)
    # the second: its own sweeps, the first key frame and that one's sweeps (5 frames)
    pts = ds.load(1).points
    assert len(pts) == 3 + n + (SWEEPS + 3) * (1 + n)
    prev = pts[np.isclose(pts[:, 4], 0.5)]  # the previous key frame, half a second before
    assert len(prev) == 1 + n
    a, b = nusc["samples"][ds.samples[0]], nusc["samples"][ds.samples[1]]
    marker_ego = np.asarray(NUSCENES_POINT_MARKER)[[1, 0]] * [1, -1] + NUSCENES_LIDAR[1][:2]
    ya, yb = math.radians(a["yaw"]), math.radians(b["yaw"])
    rot = lambda t: np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    world = rot(ya) @ marker_ego + a["translation"]
    np.testing.assert_allclose(prev[0, :2], rot(yb).T @ (world - b["translation"]), atol=1e-3)
    assert abs(b["yaw"] - a["yaw"]) == 35  # a real rotation between the two frames


def test_no_lidar_reads_no_points(nusc):
    (nusc["root"] / nusc["samples"][nusc["scenes"][0]["samples"][0]]["lidar_file"]).unlink()
    sample = NuScenesDataset(_cfg(), nusc["root"], "train", train=False)[0]
    assert "points" not in sample["image"]
    with pytest.raises(DataError) as e:
        _lidar(nusc, 1)[0]
    _one_line_error(e, "LIDAR_TOP", "LiDAR file not found")


# ------------------------------------------------------------------------------------ map


def _cell(x, y, lo=-50.0, step=0.5):
    return int((x - lo) // step), int((y - lo) // step)


def _cells(x0, x1, y0, y1, lo=-50.0, step=0.5, n=200):
    """Mask of the grid cells covering [x0, x1) x [y0, y1) (bounds on cell edges)."""
    m = np.zeros((n, n), np.uint8)
    m[round((x0 - lo) / step):round((x1 - lo) / step), round((y0 - lo) / step):round((y1 - lo) / step)] = 1
    return m


@pytest.mark.parametrize("split", ["train", "val"])  # ego yaw 90 and -30 degrees
def test_map_rasterised_in_the_ego_frame(nusc, split):
    ds = NuScenesDataset(_cfg(), nusc["root"], split, train=False)
    assert abs(nusc["samples"][ds.samples[0]]["yaw"]) in (90, 30)
    label = ds[0]["label"].numpy()
    assert label.shape == (6, 200, 200) and label.dtype == np.uint8
    k = {c: i for i, c in enumerate(ds.class_names)}

    def at(cls, x, y):
        return int(label[(k[cls], *_cell(x, y))])

    # drivable square 7..13 m ahead, |y| < 3, with a hole 9..11 x -1..1
    for x, y in [(8, 2), (12, -2), (8, -2), (12, 2)]:
        assert at("drivable_area", x, y) == 1
    assert at("drivable_area", 10, 0) == 0  # the hole
    for x, y in [(0, 10), (0, -10), (-10, 0), (0, 0)]:  # left, right, behind: nothing
        assert at("drivable_area", x, y) == 0
    assert at("ped_crossing", -10, 10) == 1 and at("ped_crossing", 10, -10) == 0
    assert at("walkway", 22, 22) == 1 and at("walkway", -22, -22) == 0
    assert at("stop_line", 0, -20) == 1 and at("stop_line", 0, 20) == 0
    assert at("carpark_area", -27, 0) == 1 and at("carpark_area", 27, 0) == 0
    # exactly the cells whose centre is inside (the shapes' edges lie on cell edges)
    np.testing.assert_array_equal(label[k["drivable_area"]],
                                  _cells(7, 13, -3, 3) - _cells(9, 11, -1, 1))
    np.testing.assert_array_equal(label[k["carpark_area"]], _cells(-30, -24, -4, 4))
    np.testing.assert_array_equal(label[k["ped_crossing"]], _cells(-12, -8, 8, 12))
    # divider = road divider (y = 5, x -20..20) + lane divider (y = -5): 1.5 m = 3 rows wide
    # (which 3 of the 4 rows within 0.75 m depends on the rounding of the map's rotation), plus
    # round caps of 2 cells at each end
    assert at("divider", 0, 5) == 1 and at("divider", 15, -5) == 1
    assert at("divider", 0, 0) == 0 and at("divider", 25, 5) == 0
    div = label[k["divider"]]
    for y in (5, -5):
        rows = div[_cell(-20, y)[0]:_cell(20, y)[0], _cell(0, y - 2)[1]:_cell(0, y + 2)[1]]
        assert (rows.sum(1) == 3).all()
    assert div.sum() == 2 * (80 * 3 + 2 * 2)


def test_map_shapes_selected_near_the_ego(nusc):
    ds = NuScenesDataset(_cfg("data.bev.classes=[drivable_area,lane,divider]"), nusc["root"], "train",
                         train=False)
    geom = ds.load(0).map
    # 7..13 m (with its hole) and 70..75 m ahead are kept; 95..100 m is beyond 50 sqrt(2) + 10
    assert len(geom.polygons["drivable_area"]) == 2
    ext, holes = geom.polygons["drivable_area"][0]
    np.testing.assert_allclose(ext, [[7, -3], [13, -3], [13, 3], [7, 3]], atol=1e-6)
    assert len(holes) == 1
    assert len(geom.lines["divider"]) == 2 and not geom.polygons.get("divider")
    label = ds[0]["label"].numpy()
    assert label[(1, *_cell(0, -42))] == 1  # the lane layer, requested by name
    assert label[1].sum() == 20 * 10  # the 10 x 5 m lane, no more


# ------------------------------------------------------------------------------------ samples


def test_getitem_end_to_end(nusc):
    ds = NuScenesDataset(_cfg("data.bev.lidar=true", "data.bev.lidar_sweeps=1"), nusc["root"], "val",
                         train=True, seed=3)
    s = ds[1]
    img = s["image"]
    assert img["images"].shape == (6, 3, 64, 96) and img["images"].dtype == torch.float32
    assert img["intrinsics"].shape == (6, 3, 3) and img["cam2ego"].shape == (6, 4, 4)
    assert img["points"].shape == (3 + 2 * nusc["random_points"] + 1, 5)
    assert s["label"].shape == (6, 200, 200) and s["label"].sum() > 0
    assert s["meta"]["name"] == ds.samples[1] and len(s["meta"]["paths"]) == 6
    again = ds[1]
    assert torch.equal(again["label"], s["label"])  # seeded augmentation
    batch = collate_bev([s, ds[0]])
    assert batch["image"]["images"].shape == (2, 6, 3, 64, 96)
    assert batch["label"].shape == (2, 6, 200, 200)
    assert batch["image"]["points_mask"].sum() == len(s["image"]["points"]) + len(ds[0]["image"]["points"])


# ------------------------------------------------------------------------------------ errors


def test_missing_or_broken_table(nusc):
    v = nusc["root"] / "v1.0-mini"
    (v / "ego_pose.json").rename(v / "ego_pose.bak")
    with pytest.raises(DataError) as e:
        NuScenesDataset(_cfg(), nusc["root"], "train", train=False)
    _one_line_error(e, "ego_pose.json", "not found")
    (v / "ego_pose.bak").rename(v / "ego_pose.json")
    (v / "log.json").write_text('[{"token": "a", ')
    with pytest.raises(DataError) as e:
        NuScenesDataset(_cfg(), nusc["root"], "train", train=False)
    _one_line_error(e, "log.json", "invalid JSON")
    rows = json.loads((v / "sample_data.json").read_text())
    del rows[4]["filename"]
    (v / "sample_data.json").write_text(json.dumps(rows))
    with pytest.raises(DataError) as e:
        read_table(v / "sample_data.json", ["token", "filename"])
    _one_line_error(e, "sample_data.json", "record 4", rows[4]["token"], "'filename'")
    (v / "scene.json").write_text('{"token": "x"}')
    with pytest.raises(DataError) as e:
        read_table(v / "scene.json", ["token", "name"])
    _one_line_error(e, "scene.json", "expected a JSON list")


def test_dangling_token(nusc):
    v = nusc["root"] / "v1.0-mini"
    rows = json.loads((v / "calibrated_sensor.json").read_text())
    rows[0]["sensor_token"] = "nope"
    (v / "calibrated_sensor.json").write_text(json.dumps(rows))
    with pytest.raises(DataError) as e:
        NuScenesDataset(_cfg(), nusc["root"], "train", train=False)
    _one_line_error(e, "sensor.json", "'nope'", rows[0]["token"])


def test_missing_image(nusc):
    ds = NuScenesDataset(_cfg(), nusc["root"], "val", train=False)
    path = nusc["root"] / nusc["samples"][ds.samples[2]]["camera_files"]["CAM_BACK"]
    path.unlink()
    ds[1]
    with pytest.raises(DataError) as e:
        ds[2]
    _one_line_error(e, str(path), "not found")


def test_unknown_split_without_devkit(nusc, monkeypatch):
    for name in ("nuscenes", "nuscenes.utils", "nuscenes.utils.splits"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails even if installed
    with pytest.raises(DataError) as e:
        NuScenesDataset(_cfg(), nusc["root"], "mini_train", train=False)
    _one_line_error(e, "splits/mini_train.txt", "split file not found", "nuscenes-devkit")


def test_unknown_class(nusc):
    with pytest.raises(DataError) as e:
        NuScenesDataset(_cfg("data.bev.classes=[drivable_area,road_edge]"), nusc["root"], "train",
                        train=False)
    _one_line_error(e, "data.bev.classes", "'road_edge'", "divider")


def test_missing_map_and_map_layer(nusc):
    maps = nusc["root"] / "maps" / "expansion"
    ds = NuScenesDataset(_cfg(), nusc["root"], "val", train=False)
    (maps / "singapore-onenorth.json").unlink()
    with pytest.raises(DataError) as e:
        ds[0]
    _one_line_error(e, "singapore-onenorth.json", "map-expansion file not found")
    m = json.loads((maps / "boston-seaport.json").read_text())
    del m["walkway"]
    (maps / "boston-seaport.json").write_text(json.dumps(m))
    with pytest.raises(DataError) as e:
        NuScenesDataset(_cfg(), nusc["root"], "train", train=False)[0]
    _one_line_error(e, "boston-seaport.json", "no map layer 'walkway'")


# ------------------------------------------------------------------------------------ check


def test_check_nuscenes(nusc):
    root, cams = nusc["root"], list(NUSCENES_CAMERA_COLOURS)
    assert check_nuscenes(root, "v1.0-mini", "train", cams, lidar=True, lidar_sweeps=SWEEPS) == []
    info = nusc["samples"][nusc["scenes"][0]["samples"][1]]
    (root / info["camera_files"]["CAM_FRONT"]).unlink()
    (root / info["sweep_files"][1]).unlink()
    (root / "maps" / "expansion" / "boston-seaport.json").unlink()
    problems = check_nuscenes(root, "v1.0-mini", "train", cams, lidar=True, lidar_sweeps=SWEEPS,
                              classes=["divider", "road_edge"])
    assert len(problems) == 4, problems
    assert any("road_edge" in p for p in problems)
    assert any(info["camera_files"]["CAM_FRONT"] in p for p in problems)
    assert any(info["sweep_files"][1] in p for p in problems)
    assert any("boston-seaport.json" in p for p in problems)
    # without LiDAR the sweep file is not needed; other split: other map, other images
    assert len(check_nuscenes(root, "v1.0-mini", "train", cams, lidar=False)) == 2
    assert check_nuscenes(root, "v1.0-mini", "val", cams, lidar=True, lidar_sweeps=SWEEPS) == []
    for t in ("sensor", "log"):
        (root / "v1.0-mini" / f"{t}.json").unlink()
    problems = check_nuscenes(root, "v1.0-mini", "val", cams, lidar=False)
    assert len(problems) == 2 and all("table not found" in p for p in problems)
    assert check_nuscenes(root / "nowhere", "v1.0-mini", "val", cams, False)[0].endswith("not found")
