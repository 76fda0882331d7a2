"""The official DDP BEV camera model: its recorded layout converts strictly into
``model.bev.arch: bevfusion``; the official geometry rules hold; the LiDAR model is refused in
one line. (Numerical parity with the official code: benchmarks/official_parity_bev.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from densediff.encoders.bevfusion import CameraFPN, DepthLift, official_frustum
from densediff.errors import CheckpointError, ConfigError, UserError
from densediff.official.catalog import find_released
from densediff.official.convert import describe, load_official, released_for
from densediff.official.mapping import convert_bev_state
from densediff.tasks import build_model, load_config
from densediff.testing.official import assert_not_strict, official_layout, released_state
from densediff.utils.grid import BEVGrid

FIX = Path(__file__).parent / "fixtures" / "official"
CAMERA = "ddp-camera-bev256d2-lss-scale001-d5-lr5e-5"
FUSION = "ddp-fusion-bev256d2-lss-scale001-d5-lr5e-5"


def _layout() -> dict[str, torch.Tensor]:
    return official_layout(CAMERA)


@pytest.fixture(scope="module")
def own_state() -> dict[str, torch.Tensor]:
    return released_state(CAMERA, 6)


def test_released_camera_layout_is_recognised_and_every_key_converts_strictly(own_state):
    state = _layout()
    assert len(state) == 443  # recorded from the official modules (official_bev_oracle.py keys)
    entry = released_for(describe(state, "x.pth"), {}, "x.pth")
    assert entry.name == CAMERA and entry.config.endswith("_bevfusion.yaml")
    converted = convert_bev_state(state, own_state, "x.pth")
    assert set(converted) == set(own_state)
    assert all(converted[k].shape == own_state[k].shape for k in own_state)


def test_a_missing_extra_or_misshaped_bev_key_is_one_error_listing_them(own_state):
    state = _layout()
    del state["decoder.neck.fuse.4.running_var"]
    state["heads.map.extra.weight"] = torch.empty(3, device="meta")
    state["encoders.camera.vtransform.depthnet.weight"] = torch.empty(199, 256, 1, 1,
                                                                      device="meta")
    assert_not_strict(convert_bev_state, state, own_state,
                      ("heads.map.extra.weight", "view.neck.fuse.4.running_var",
                       "view.lift.depthnet.weight"))


def test_untimed_head_is_refused_in_one_line():
    untimed = {k: v for k, v in _layout().items() if ".time_mlp." not in k or "heads" not in k}
    with pytest.raises(CheckpointError, match="no time input") as e:
        describe(untimed, "u.pth")
    assert "\n" not in str(e.value)
    assert find_released(FUSION).lidar and not find_released(CAMERA).lidar


def test_a_segmentation_config_for_a_bev_checkpoint_is_a_user_error(tmp_path):
    f = tmp_path / "bev.pth"
    torch.save({"state_dict": {"encoders.camera.backbone.x": torch.ones(1),
                               "heads.map.conv_seg.weight": torch.ones(6, 1, 1, 1)}}, f)
    with pytest.raises(UserError, match="arch: bevfusion"):
        load_official(f, "nuscenes/ddp_c_swin_t.yaml")


def test_bevfusion_arch_lifts_stride_8_and_a_camera_model_refuses_points():
    with pytest.raises(ConfigError, match="camera_stride"):
        load_config("nuscenes/ddp_c_swin_t_bevfusion.yaml", ["model.bev.camera_stride=4"])
    with torch.device("meta"):
        model = build_model(load_config("nuscenes/ddp_c_swin_t_bevfusion.yaml"), 6)
    assert model.view.lidar is None and model.view.fuser is None
    with pytest.raises(ValueError, match="camera-only"):
        model.view(torch.zeros(1, 256, 4, 8), (32, 64), torch.eye(3)[None, None],
                   torch.eye(4)[None, None], points=torch.zeros(1, 3, 5))


def test_official_frustum_uses_bin_starts_and_corner_aligned_pixels():
    fr = official_frustum((16, 40), (4, 5), (1.0, 3.0, 0.5))
    assert fr.shape == (4, 4, 5, 3)
    assert fr[:, 0, 0, 2].tolist() == [1.0, 1.5, 2.0, 2.5]  # starts, not centres
    assert fr[0, 0, :, 0].tolist() == [0.0, 9.75, 19.5, 29.25, 39.0]  # linspace(0, W - 1, w)
    assert fr[0, :, 0, 1].tolist() == [0.0, 5.0, 10.0, 15.0]


def test_cells_truncate_toward_zero_as_the_official_bev_pool_indexing():
    lift = DepthLift(4, 2, (1.0, 2.0, 0.5), (-10.0, 10.0), BEVGrid((-4.0, 4.0, 2.0),
                                                                   (-4.0, 4.0, 2.0)), 2)
    assert lift.shape == (8, 8)  # 1 m cells
    pts = torch.tensor([[[-3.5, 0.2, 0.0],    # cell (0, 4)
                         [-4.5, 0.2, 0.0],    # half a cell below the edge: trunc -> cell 0
                         [-5.1, 0.2, 0.0],    # more than a cell below: dropped
                         [3.9, 3.9, -25.0],   # z 15 m below the range still truncates to 0
                         [3.9, 3.9, 10.0],    # z at the top edge: dropped
                         [4.0, 0.0, 0.0]]])   # x at the top edge: dropped
    flat, keep = lift.cells(pts)
    assert keep[0].tolist() == [True, True, False, True, False, False]
    assert flat.tolist() == [4, 4, 63]


def test_camera_fpn_uses_the_last_levels_top_down():
    torch.manual_seed(0)
    fpn = CameraFPN([4, 6, 8], 5).eval()
    levels = [torch.randn(1, c, 16 // 2**i, 16 // 2**i) for i, c in enumerate([3, 4, 6, 8])]
    out = fpn(levels)
    assert out.shape == (1, 5, 8, 8)
    levels[0] = levels[0] * 100  # the stride-4 level is not used
    assert torch.equal(fpn(levels), out)
    levels[-1] = levels[-1] + 1  # the coarsest one reaches the output through both steps
    assert not torch.allclose(fpn(levels), out)


def test_nuscenes_lidar_frame_moves_cameras_points_and_map_into_the_lidar_sensor_frame(tmp_path):
    """``data.bev.frame: lidar`` (the official BEV frame): everything is the ego-frame sample
    moved by the inverse LIDAR_TOP calibration."""
    import numpy as np

    from densediff.data.nuscenes import NuScenesDataset
    from densediff.testing.fixtures import write_nuscenes

    nusc = write_nuscenes(tmp_path / "nuscenes", sweeps_per_sample=1)
    records = {}
    for frame in ("ego", "lidar"):
        data = load_config(None, ["task=bev", "data.dataset=nuscenes", "data.bev.lidar=true",
                                  "model.aux_head.enabled=false", "data.bev.image_size=[64,96]",
                                  "data.bev.version=v1.0-mini", f"data.bev.frame={frame}"]).data
        ds = NuScenesDataset(data, nusc["root"], "train", train=False)
        records[frame] = ds.load(0)
        tables = ds.tables
    ego, lid = records["ego"], records["lidar"]
    key = tables.key_frame(ds.samples[0], "LIDAR_TOP")
    lidar2ego = tables.pose("calibrated_sensor", tables.get(
        "calibrated_sensor", key["calibrated_sensor_token"]))
    assert not np.allclose(lidar2ego, np.eye(4))  # the fixture's LiDAR is mounted off-centre
    to_lidar = np.linalg.inv(lidar2ego)
    np.testing.assert_allclose(lid.cam2ego, to_lidar @ ego.cam2ego, atol=1e-9)
    np.testing.assert_allclose(lid.points[:, :3], ego.points[:, :3] @ to_lidar[:3, :3].T
                               + to_lidar[:3, 3], atol=1e-4)
    # the map: the same shapes, moved in 2-D by the LiDAR's yaw and x-y offset
    name = next(n for n, polys in ego.map.polygons.items() if polys)
    yaw = np.arctan2(lidar2ego[1, 0], lidar2ego[0, 0])
    rot = np.array([[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]])
    moved = (ego.map.polygons[name][0][0] - lidar2ego[:2, 3]) @ rot
    np.testing.assert_allclose(lid.map.polygons[name][0][0], moved, atol=1e-6)
