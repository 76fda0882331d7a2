"""The official DDP camera + LiDAR BEV model: its recorded layout converts strictly into
``model.bev.arch: bevfusion`` with ``data.bev.lidar``; the gather-based sparse conv equals a
dense conv3d read at the active sites; voxelisation follows the official rules; the model runs
end to end. (Numerical parity with the official code: benchmarks/official_parity_bev_fusion.py.)
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from densediff.encoders.bevfusion_lidar import (
    SECOND,
    SECONDFPN,
    SparseConv3d,
    SparseEncoder,
    SparseTensor,
    voxelize,
)
from densediff.errors import CheckpointError, ConfigError, UserError
from densediff.official.catalog import find_released
from densediff.official.convert import describe, load_official, released_for
from densediff.official.mapping import convert_bev_state
from densediff.tasks import build_model, load_config
from densediff.testing.official import assert_not_strict, official_layout

FIX = Path(__file__).parent / "fixtures" / "official"
FUSION = "ddp-fusion-bev256d2-lss-scale001-d5-lr5e-5"


def _layout() -> dict[str, torch.Tensor]:
    return official_layout(FUSION)


@pytest.fixture(scope="module")
def own_state() -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = build_model(load_config(find_released(FUSION).config), 6)
    assert model.feat_channels == 512  # SECONDFPN 256 + 256, as the official feat_channels
    return model.state_dict()


def test_released_fusion_layout_is_recognised_and_every_key_converts_strictly(own_state):
    state = _layout()
    assert len(state) == 551  # recorded from the official modules (official_bev_fusion_oracle)
    assert state["encoders.lidar.backbone.conv_input.0.weight"].shape == (3, 3, 3, 5, 16)
    entry = released_for(describe(state, "x.pth"), {}, "x.pth")
    assert entry.name == FUSION and entry.lidar
    assert entry.config == "nuscenes/ddp_cl_swin_t_bevfusion.yaml"
    converted = convert_bev_state(state, own_state, "x.pth")
    assert set(converted) == set(own_state)
    assert all(converted[k].shape == own_state[k].shape for k in own_state)
    assert "sparse conv vs a dense reference" in entry.proven


def test_a_missing_extra_or_misshaped_lidar_key_is_one_error_listing_them(own_state):
    state = _layout()
    del state["encoders.lidar.backbone.encoder_layers.encoder_layer3.1.bn2.running_var"]
    state["fuser.3.weight"] = torch.empty(3, device="meta")
    state["encoders.lidar.backbone.conv_out.0.weight"] = torch.empty(1, 1, 3, 128, 64,
                                                                     device="meta")
    assert_not_strict(convert_bev_state, state, own_state,
                      ("view.fuser.3.weight", "encoder_layer3.1.bn2.running_var",
                       "view.lidar.backbone.conv_out.0.weight"))


def test_a_partial_lidar_layout_and_a_camera_config_are_refused_in_one_line(tmp_path):
    partial = {k: v for k, v in _layout().items() if not k.startswith("fuser.")}
    with pytest.raises(CheckpointError, match="no SparseEncoder input conv or ConvFuser"):
        describe(partial, "p.pth")
    f = tmp_path / "fusion.pth"
    torch.save({"state_dict": {"encoders.camera.backbone.x": torch.ones(1),
                               "encoders.lidar.backbone.conv_input.0.weight": torch.ones(1),
                               "heads.map.conv_seg.weight": torch.ones(6, 1, 1, 1)}}, f)
    with pytest.raises(UserError, match="camera \\+ LiDAR: set data.bev.lidar: true") as e:
        load_official(f, "nuscenes/ddp_c_swin_t_bevfusion.yaml")
    assert "\n" not in str(e.value)


def _random_sparse(shape, n, batch, cin, g) -> SparseTensor:
    x, y, z = shape
    keys = torch.randint(0, batch * x * y * z, (4 * n,), generator=g).unique()
    keys = keys[torch.randperm(len(keys), generator=g)[:n]]
    assert len(keys) == n
    coords = torch.stack([keys // (x * y * z), keys // (y * z) % x, keys // z % y, keys % z], 1)
    return SparseTensor(torch.randn(n, cin, generator=g), coords, shape, batch)


@pytest.mark.parametrize("kernel,stride,padding,subm", [
    (3, 1, 1, True), (5, 1, 2, True), ((1, 3, 3), 1, (0, 1, 1), True),
    (3, 2, 1, False), (3, 2, (1, 1, 0), False), (3, 2, 0, False), (2, 2, 0, False),
    ((1, 1, 3), (1, 1, 2), 0, False), (3, 1, 1, False)])
def test_sparse_conv_equals_dense_conv3d_at_the_active_sites(kernel, stride, padding, subm):
    g = torch.Generator().manual_seed(0)
    conv = SparseConv3d(3, 4, kernel, stride, padding, subm)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
    x = _random_sparse((9, 7, 6), 70, 2, 3, g)
    with torch.no_grad():
        y = conv(x)
        dense = x.dense()
        ref = F.conv3d(dense, conv.weight.permute(4, 3, 0, 1, 2), stride=conv.stride,
                       padding=conv.padding)
    assert tuple(ref.shape[2:]) == y.shape
    active = torch.zeros(ref.shape[0], *ref.shape[2:], dtype=torch.bool)
    active[tuple(y.coords.T)] = True
    if subm:
        assert torch.equal(y.coords, x.coords)
    else:  # the output sites: every site with an active input under the kernel
        support = F.conv3d(dense.abs().sum(1, keepdim=True), torch.ones(1, 1, *conv.kernel),
                           stride=conv.stride, padding=conv.padding)[:, 0] > 0
        assert torch.equal(active, support)
    assert float((y.dense() - ref * active[:, None]).abs().max()) <= 1e-5
    assert float(ref.abs().max()) > 1  # a real comparison, not of zeros


def _voxelize_loop(points, low, size, grid, max_points, max_voxels):
    """The official hard voxelisation, point by point (voxelization_cpu.cpp's loop)."""
    table, coords, sums, counts = {}, [], [], []
    lo, sz = torch.tensor(low), torch.tensor(size)
    for p in points:
        c = torch.floor((p[:3] - lo) / sz).long().tolist()
        if any(v < 0 or v >= n for v, n in zip(c, grid)):
            continue
        key = tuple(c)
        if key not in table:
            if len(table) >= max_voxels:
                continue
            table[key] = len(coords)
            coords.append(c)
            sums.append(torch.zeros_like(p))
            counts.append(0)
        v = table[key]
        if counts[v] < max_points:
            sums[v] = sums[v] + p
            counts[v] += 1
    return torch.stack([s / n for s, n in zip(sums, counts)]), torch.tensor(coords)


def test_voxelize_follows_the_official_order_and_limits():
    g = torch.Generator().manual_seed(0)
    xyz = torch.rand(400, 3, generator=g) * torch.tensor([4.4, 4.4, 2.2]) - torch.tensor(
        [2.2, 2.2, 1.1])  # some outside [-2, 2] x [-2, 2] x [-1, 1]
    xyz[:120] = torch.tensor([0.05, -0.35, 0.1]) + 0.01 * torch.randn(120, 3, generator=g)
    pts = torch.cat([xyz, torch.rand(400, 2, generator=g)], 1)[torch.randperm(400, generator=g)]
    rng, size = (-2.0, -2.0, -1.0, 2.0, 2.0, 1.0), (0.5, 0.5, 0.4)
    for max_points, max_voxels in ((10, 1000), (3, 40)):
        feats, coords = voxelize(pts, rng, size, max_points, max_voxels)
        ref_f, ref_c = _voxelize_loop(pts, rng[:3], size, (8, 8, 5), max_points, max_voxels)
        assert torch.equal(coords, ref_c)  # same voxels, numbered by first appearance
        assert torch.allclose(feats, ref_f, atol=1e-6)
    assert len(coords) == 40  # max_voxels reached


def test_sparse_encoder_official_sizes_and_height_stacking():
    with torch.device("meta"):
        enc = SparseEncoder(5, (1024, 1024, 41), ((16, 16, 32), (32, 32, 64), (64, 64, 128),
                                                   (128, 128)), ((1, 1, 1), (1, 1, 1), (1, 1, 0)),
                            128)
    assert enc.bev_shape == (128, 128, 2) and enc.out_channels == 256
    torch.manual_seed(0)
    small = SparseEncoder(2, (16, 16, 41), ((4, 4, 4), (4, 4, 4), (4, 4, 4), (4, 4)),
                          ((1, 1, 1), (1, 1, 1), (1, 1, 0)), 3).eval()
    g = torch.Generator().manual_seed(1)
    x = _random_sparse((16, 16, 41), 300, 2, 2, g)
    bev = small(x.feats, x.coords, 2)
    last = small.stages(x.feats, x.coords, 2)[-1].dense()  # B C X Y Z, Z = 2
    assert bev.shape == (2, 6, 2, 2)
    assert torch.equal(bev[:, 1::2], last[..., 1]) and torch.equal(bev[:, ::2], last[..., 0])


def test_second_decoder_returns_to_the_input_grid():
    torch.manual_seed(0)
    second = SECOND(6, (4, 8), (1, 2), 2)
    fpn = SECONDFPN((4, 8), (5, 7), (1, 2))
    out = fpn(second(torch.randn(1, 6, 10, 12)))
    assert out.shape == (1, 12, 10, 12) and fpn.out_channels == 12
    assert len(second.blocks[1]) == 9  # strided conv + 2 convs, each conv-BN-ReLU
    assert isinstance(fpn.deblocks[1][0], torch.nn.ConvTranspose2d)


TINY = ["task=bev", "model.type=ddp", "model.aux_head.enabled=false",
        "model.head.type=deformable", "model.head.num_layers=1", "model.head.channels=32",
        "model.head.num_heads=4", "model.head.ffn_channels=64", "model.neck.channels=32",
        "model.neck.num_groups=8", "model.diffusion.embed_channels=16",
        "data.bev.xbound=[-8,8,0.5]", "data.bev.ybound=[-8,8,0.5]",
        "data.bev.feat_xbound=[-8,8,0.8]", "data.bev.feat_ybound=[-8,8,0.8]",
        "data.bev.dbound=[1,17,1]", "data.bev.image_size=[32,64]", "data.bev.lidar=true",
        "model.bev.arch=bevfusion", "model.bev.camera_stride=8", "model.bev.camera_channels=8",
        "model.bev.bev_decoder=second", "model.bev.decoder_channels=[8,16]",
        "model.bev.decoder_strides=[1,2]", "model.bev.fpn_channels=[16,16]",
        "model.bev.bev_blocks=1", "model.bev.fused_channels=16",
        "model.bev.point_range=[-8,-8,-4,8,8,4]", "model.bev.voxel_size=[0.1,0.1,0.2]",
        "model.bev.sparse_channels=[[4,4,8],[8,8,8],[8,8,8],[8,8]]",
        "model.bev.sparse_out_channels=4"]


def _inputs(g) -> dict:
    rot = torch.tensor([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]])
    c2e = torch.eye(4).repeat(2, 1, 1)
    for i, yaw in enumerate((0.0, math.pi)):
        c, s = math.cos(yaw), math.sin(yaw)
        c2e[i, :3, :3] = torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ rot
    k = torch.tensor([[40.0, 0, 32], [0, 40, 16], [0, 0, 1]])
    pts = torch.cat([torch.rand(1, 600, 3, generator=g) * torch.tensor([18.0, 18, 7])
                     - torch.tensor([9.0, 9, 3.5]), torch.rand(1, 600, 2, generator=g)], 2)
    return {"images": torch.randn(1, 2, 3, 32, 64, generator=g),
            "intrinsics": k.expand(1, 2, 3, 3).clone(), "cam2ego": c2e[None],
            "points": pts, "points_mask": torch.ones(1, 600, dtype=torch.bool)}


def test_tiny_fusion_model_runs_end_to_end_and_uses_the_points():
    torch.manual_seed(0)
    model = build_model(load_config(None, TINY), 6).eval()
    assert model.view.lidar.bev_shape == (20, 20)
    inputs = _inputs(torch.Generator().manual_seed(0))
    with torch.no_grad():
        feat = model.extract(inputs)
        assert feat.shape == (1, 32, 20, 20)
        probs = model.predict_map(inputs, 2, seeds=[0], randsteps=2)
        assert probs.shape == (1, 6, 32, 32) and 0 <= float(probs.min()) <= float(probs.max()) <= 1
        moved = dict(inputs, points=inputs["points"] + torch.tensor([0.7, 0, 0, 0, 0]))
        assert not torch.allclose(model.extract(moved), feat)
    model.train()
    losses = model(inputs, (torch.rand(1, 6, 32, 32) > 0.6).to(torch.uint8))
    losses["loss"].backward()
    assert getattr(model.view.lidar.backbone.conv_input, "0").weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="points"):
        model.extract({k: v for k, v in inputs.items() if not k.startswith("points")})


def test_a_batch_of_two_point_clouds_is_bit_identical_to_each_alone():
    """What ``predict`` runs a batch with (``batch_invariant``): two samples with different
    point counts (the batch pads them) give exactly their results alone."""
    from densediff.utils.batching import batch_invariant

    torch.manual_seed(0)
    model = build_model(load_config(None, TINY), 6).eval()
    a, b = _inputs(torch.Generator().manual_seed(0)), _inputs(torch.Generator().manual_seed(1))
    b = dict(b, points=b["points"][:, :450], points_mask=b["points_mask"][:, :450])
    both = {k: torch.cat([a[k], b[k]]) for k in ("images", "intrinsics", "cam2ego")}
    both["points"] = torch.cat([a["points"], F.pad(b["points"], (0, 0, 0, 150))])
    both["points_mask"] = torch.cat([a["points_mask"], F.pad(b["points_mask"], (0, 150))])
    with torch.no_grad():
        alone = [model.predict_map(x, 2, seeds=[s]) for x, s in ((a, 3), (b, 4))]
        with batch_invariant(model, 2):
            together = model.predict_map(both, 2, seeds=[3, 4])
    assert torch.equal(together[:1], alone[0]) and torch.equal(together[1:], alone[1])


@pytest.mark.parametrize("override,match", [
    ("model.bev.point_range=[-9,-8,-4,9,8,4]", "must be the same"),
    ("model.bev.point_range=[-8,-8,-1,8,8,1]", "height voxels"),
])
def test_lidar_grid_that_cannot_meet_the_feature_grid_is_a_config_error(override, match):
    cfg = load_config(None, [*TINY, override])
    with pytest.raises(ConfigError, match=match) as e, torch.device("meta"):
        build_model(cfg, 6)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override,match", [
    ("model.bev.sparse_paddings=[[1,1,1],[1,1,1]]", "one \\(x, y, z\\) triple per stage"),
    ("model.bev.sparse_channels=[[4,6,8],[8,8,8],[8,8,8],[8,8]]", "keep their input channels"),
    ("model.bev.fpn_channels=[16]", "differ in length"),
    ("model.bev.point_range=[8,-8,-4,-8,8,4]", "must exceed"),
])
def test_bad_lidar_settings_are_one_line_config_errors(override, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(None, [*TINY, override])
    assert "\n" not in str(e.value)


def test_sparse_conv_scales_with_active_sites_not_the_grid():
    """The official grid (1024 x 1024 x 41, 43M sites) with a few hundred active voxels: fast
    and small, as nothing dense is allocated."""
    g = torch.Generator().manual_seed(0)
    conv = SparseConv3d(4, 4, 3, 2, 1)
    x = _random_sparse((1024, 1024, 41), 500, 1, 4, g)
    with torch.no_grad():
        y = conv(x)
    assert y.shape == (512, 512, 21) and len(y.coords) <= 500 * 8
    offsets = list(itertools.product(range(3), repeat=3))
    assert conv.offsets.tolist() == [list(o) for o in offsets]  # spconv's row-major order


ORACLE_ENV = ("DENSEDIFF_ORACLE", "BEV", "BEV_SITE", "SPCONV_EXT", "VOXEL_EXT")


def test_lidar_branch_equals_the_official_ops_when_the_oracle_is_present(tmp_path):
    """Optional: the official ``Voxelization`` + ``SparseEncoder`` (spconv 1.x and the voxel op
    built for the CPU, see benchmarks/official_bev_fusion_oracle.py) on 2,000 points against
    densediff's, stage by stage. Skipped unless the oracle's environment names them."""
    import os
    import subprocess

    missing = [k for k in ORACLE_ENV if not os.environ.get(k)
               or not Path(os.environ[k]).exists()]
    if missing:
        pytest.skip(f"BEV fusion oracle not configured ({', '.join(missing)} unset or missing)")
    opy = Path(os.environ["DENSEDIFF_ORACLE"]) / "venv" / "bin" / "python"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "official_bev_fusion_oracle.py"
    res = subprocess.run([str(opy), str(script), "sparse", str(tmp_path), "--points", "2000",
                          "--seed", "4"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": ""})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    d = torch.load(tmp_path / "sparse_encoder.pt", weights_only=False)
    v = d["voxelize"]
    feats, coords = voxelize(d["points"], v["point_cloud_range"], v["voxel_size"],
                             v["max_num_points"], v["max_voxels"][1])
    assert torch.equal(coords, d["voxel_coords"][:, 1:].long())
    assert float((feats - d["voxel_feats"]).abs().max()) <= 1e-5
    enc = SparseEncoder(5, d["sparse_shape"], ((16, 16, 32), (32, 32, 64), (64, 64, 128),
                                               (128, 128)), ((1, 1, 1), (1, 1, 1), (1, 1, 0)),
                        128).eval()
    enc.load_state_dict(d["state_dict"])  # the official names and spconv layout, as they are
    with torch.no_grad():
        ours = enc.stages(d["voxel_feats"], d["voxel_coords"].long(), 1)
        bev = enc(d["voxel_feats"], d["voxel_coords"].long(), 1)
    def by_site(coords, feats, shape):
        x, y, z = shape
        order = (((coords[:, 0] * x + coords[:, 1]) * y + coords[:, 2]) * z
                 + coords[:, 3]).argsort()
        return coords[order], feats[order]

    for mine, ref in zip(ours, d["stages"]):
        c_mine, f_mine = by_site(mine.coords, mine.feats, mine.shape)
        c_ref, f_ref = by_site(ref["indices"].long(), ref["features"], mine.shape)
        assert list(mine.shape) == list(ref["shape"])
        assert torch.equal(c_mine, c_ref)  # the same active sites
        assert float((f_mine - f_ref).abs().max()) <= 1e-5
    assert float((bev - d["bev"]).abs().max()) <= 1e-5 and float(d["bev"].abs().max()) > 0.1
