"""BEV: view transform geometry, pooling, LiDAR pillars, grid resampling, map encoding, focal
loss, threshold IoU, the BEV DDP / twin, the rasteriser and the augmentation geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from densediff.criteria.bev import BEVIoUMetric, sigmoid_focal_loss
from densediff.data.bev import (
    DIVIDER_WIDTH,
    MapGeometry,
    bev_augmentation,
    collate_bev,
    image_affine,
    rasterize_map,
    warp_image,
)
from densediff.decoders.bev import BEVGridTransform
from densediff.diffusion.encodings import MultiLabelEmbedding
from densediff.encoders.bev import PillarEncoder
from densediff.encoders.lss import LSSTransform, bev_pool, depth_bins, frustum, lift_points
from densediff.engine.optim import cyclic_ratio, scheduled_lr, set_lr
from densediff.errors import ConfigError
from densediff.models import BEVDDP, BEVSegmentor
from densediff.tasks import build_model, load_config
from densediff.testing.spies import assert_self_aligned, record_denoise
from densediff.utils.grid import BEVGrid

GRID = BEVGrid((-25.6, 25.6, 0.8), (-25.6, 25.6, 0.8))
# a forward-looking camera 1.5 m above the ground: camera x -> ego -y, y -> ego -z, z -> ego x
R_FRONT = np.array([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]])
K = np.array([[100.0, 0, 88], [0, 100, 32], [0, 0, 1]])


def cam2ego(rot: np.ndarray = R_FRONT, t=(0.0, 0.0, 1.5)) -> torch.Tensor:
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = rot, t
    return torch.tensor(m, dtype=torch.float32)


def tiny_cfg(*extra: str):
    return load_config(None, [
        "task=bev", "model.type=ddp", "model.aux_head.enabled=false", "model.head.type=deformable",
        "model.head.num_layers=1", "model.head.channels=32", "model.head.num_heads=4",
        "model.head.ffn_channels=64", "model.neck.channels=32", "model.neck.num_groups=8",
        "model.bev.camera_channels=8", "model.bev.lidar_channels=8", "model.bev.fused_channels=32",
        "model.bev.bev_blocks=1", "model.diffusion.embed_channels=16",
        "data.bev.xbound=[-8,8,0.5]", "data.bev.ybound=[-8,8,0.5]",
        "data.bev.feat_xbound=[-8,8,0.8]", "data.bev.feat_ybound=[-8,8,0.8]",
        "data.bev.dbound=[1,17,1]", "data.bev.image_size=[32,64]", *extra])


def tiny_inputs(b: int = 2, n: int = 2, points: bool = False) -> dict:
    g = torch.Generator().manual_seed(0)
    yaw = [0.0, math.pi]
    c2e = torch.stack([cam2ego(np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0],
                                         [0, 0, 1]]) @ R_FRONT) for a in yaw[:n]])
    k = torch.tensor([[40.0, 0, 32], [0, 40, 16], [0, 0, 1]])
    inputs = {"images": torch.randn(b, n, 3, 32, 64, generator=g),
              "intrinsics": k.expand(b, n, 3, 3).clone(), "cam2ego": c2e.expand(b, n, 4, 4).clone()}
    if points:
        inputs["points"] = torch.randn(b, 50, 5, generator=g) * 5
        inputs["points_mask"] = torch.ones(b, 50, dtype=torch.bool)
    return inputs


# ------------------------------------------------------------------------------ geometry


def test_lift_points_puts_a_ground_point_back_on_the_ground():
    # ego point (10, 2, 0): camera coords (-2, 1.5, 10) -> pixel (68, 47), depth 10
    fr = torch.tensor([[[[68.0, 47.0, 10.0]]]])  # D x h x w x 3 with D = h = w = 1
    pts = lift_points(fr, torch.tensor(K, dtype=torch.float32)[None, None], cam2ego()[None, None])
    assert torch.allclose(pts.reshape(3), torch.tensor([10.0, 2.0, 0.0]), atol=1e-4)


def test_frustum_uses_cell_centres_and_bin_centres():
    fr = frustum((32, 64), (8, 16), (1.0, 5.0, 1.0))
    assert fr.shape == (4, 8, 16, 3)
    assert torch.allclose(depth_bins((1.0, 5.0, 1.0)), torch.tensor([1.5, 2.5, 3.5, 4.5]))
    assert fr[0, 0, 0].tolist() == [2.0, 2.0, 1.5]  # cell (0, 0) covers pixels [0, 4)
    assert fr[3, 7, 15].tolist() == [62.0, 30.0, 4.5]


def test_view_transform_puts_a_known_ground_point_into_its_bev_cell():
    # Feature cell (row 11, col 17) of a 64 x 176 image at stride 4 has its pixel centre at
    # (u, v) = (70, 46). Its ray meets the ground (1.5 m below the camera) at depth
    # 1.5 / 0.14 = 10.714 m: ego (10.714, 1.929, 0) -> cell (45, 34) of the 0.8 m grid.
    lss = LSSTransform(1, 1, (1.0, 36.0, 1.0), (-10.0, 10.0), GRID)
    depth_bin = int((1.5 / 0.14 - 1.0) // 1.0)  # the bin holding 10.714 m
    with torch.no_grad():
        lss.depthnet.weight.zero_()
        lss.depthnet.bias.fill_(-50.0)
        lss.depthnet.bias[depth_bin] = 50.0  # all depth mass in that bin
        lss.depthnet.weight[-1, 0] = 1.0  # context = the input feature
        lss.depthnet.bias[-1] = 0.0
    feat = torch.zeros(1, 1, 16, 44)
    feat[0, 0, 11, 17] = 1.0
    out = lss(feat, (64, 176), torch.tensor(K, dtype=torch.float32)[None, None],
              cam2ego()[None, None])
    assert out.shape == (1, 1, 64, 64)
    hot = (out[0, 0] > 0.5).nonzero().tolist()
    x, y = 1.5 / 0.14, 0.18 * 1.5 / 0.14
    ix, iy = GRID.cell_of(torch.tensor(x), torch.tensor(y))
    assert hot == [[int(ix), int(iy)]] == [[45, 34]]
    assert float(out.detach().sum()) == pytest.approx(1.0, abs=1e-4)


def test_bev_pool_equals_a_slow_loop():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 300, 3, generator=g)
    pts = torch.randn(2, 300, 3, generator=g) * torch.tensor([20.0, 20.0, 8.0])
    out = bev_pool(feats, pts, GRID, (-5.0, 5.0))
    ref = torch.zeros_like(out)
    nx, ny = GRID.shape
    for b in range(2):
        for i in range(300):
            x, y, z = pts[b, i].tolist()
            ix, iy = math.floor((x + 25.6) / 0.8), math.floor((y + 25.6) / 0.8)
            if 0 <= ix < nx and 0 <= iy < ny and -5 <= z < 5:
                ref[b, :, ix, iy] += feats[b, i]
    assert torch.allclose(out, ref, atol=1e-5)
    assert float(ref.abs().sum()) > 0


def test_pillar_features_equal_a_slow_reference():
    enc = PillarEncoder(4, GRID, (-5.0, 5.0)).eval()  # BatchNorm with its running statistics
    enc.convs = torch.nn.Identity()
    g = torch.Generator().manual_seed(2)
    pts = torch.randn(1, 40, 5, generator=g) * torch.tensor([2.0, 2.0, 1.0, 1.0, 0.1])
    mask = torch.ones(1, 40, dtype=torch.bool)
    mask[0, -5:] = False
    out = enc(pts, mask)
    ref = torch.zeros_like(out)
    cells: dict = {}
    for i in range(35):
        x, y = pts[0, i, :2].tolist()
        cells.setdefault((math.floor((x + 25.6) / 0.8), math.floor((y + 25.6) / 0.8)), []).append(i)
    for (ix, iy), idx in cells.items():
        p = pts[0, idx]
        centre = torch.tensor([-25.6 + (ix + 0.5) * 0.8, -25.6 + (iy + 0.5) * 0.8])
        f = torch.cat([p, p[:, :3] - p[:, :3].mean(0), p[:, :2] - centre], 1)
        ref[0, :, ix, iy] = enc.embed(f).max(0).values
    assert torch.allclose(out, ref, atol=1e-5)
    assert len(cells) > 3


def test_grid_transform_identity_and_linear_resampling():
    same = BEVGridTransform(GRID, GRID)
    x = torch.randn(1, 2, 64, 64)
    assert torch.allclose(same(x), x, atol=1e-5)
    target = BEVGrid((-20.0, 20.0, 0.5), (-20.0, 20.0, 0.5))
    cx, _ = GRID.centres()
    ramp = torch.tensor(cx, dtype=torch.float32)[None, None, :, None].expand(1, 1, 64, 64)
    out = BEVGridTransform(GRID, target)(ramp.contiguous())
    tx, _ = target.centres()
    assert out.shape == (1, 1, 80, 80)
    # bilinear resampling reproduces a linear function of x exactly (inside the source grid)
    assert torch.allclose(out[0, 0, :, 5], torch.tensor(tx, dtype=torch.float32), atol=1e-4)


# ------------------------------------------------------------------------------ encoding, loss, metric


def test_multilabel_embedding_formula():
    enc = MultiLabelEmbedding(3, channels=4, scale=0.01)
    masks = torch.tensor([[1, 0, 1], [0, 0, 0]], dtype=torch.float32).view(2, 3, 1, 1)
    out = enc(masks.permute(1, 0, 2, 3).reshape(1, 3, 2, 1))  # cells: {0, 2} and {}
    w = enc.embedding.weight.detach()
    cell0 = (w[1] + w[0] + w[3]) / 3  # channel c holds c (1..3) where set, 0 elsewhere
    cell1 = w[0]
    for cell, emb in ((0, cell0), (1, cell1)):
        assert torch.allclose(out[0, :, cell, 0], (emb.sigmoid() * 2 - 1) * 0.01, atol=1e-7)
    assert out.abs().max() <= 0.01


def test_focal_loss_against_the_formula():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 4, 5, generator=g)
    target = (torch.rand(2, 3, 4, 5, generator=g) > 0.5).float()
    p = torch.sigmoid(logits).numpy().astype(np.float64)
    t = target.numpy()
    pt = np.where(t > 0, p, 1 - p)
    for alpha in (None, 0.25):
        a = 1.0 if alpha is None else np.where(t > 0, alpha, 1 - alpha)
        ref = (-a * (1 - pt) ** 2 * np.log(pt)).transpose(1, 0, 2, 3).reshape(3, -1).mean(1)
        out = sigmoid_focal_loss(logits, target, 2.0, alpha)
        assert np.allclose(out.numpy(), ref, atol=1e-6)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 1], target[:, 1])
    assert float(sigmoid_focal_loss(logits, target, 0.0)[1]) == pytest.approx(float(bce), abs=1e-6)


def test_threshold_iou_by_hand():
    probs = torch.tensor([0.9, 0.6, 0.5, 0.3, 0.1, 0.45]).view(1, 1, 2, 3)
    target = torch.tensor([1, 1, 0, 1, 0, 0]).view(1, 1, 2, 3)
    m = BEVIoUMetric(["a"])
    m.update(probs, target)
    r = m.compute()
    # threshold 0.35: pred {0.9, .6, .5, .45} -> tp 2, fp 2, fn 1 -> 2/5; 0.5: {.9, .6, .5}:
    # tp 2, fp 1, fn 1 -> 2/4; 0.55/0.6: {.9, .6}: tp 2, fn 1 -> 2/3; 0.65: {.9}: 1/3
    expect = [40.0, 40.0, 40.0, 50.0, 200 / 3, 200 / 3, 100 / 3]
    assert np.allclose(r["table"]["a"], expect)
    assert r["per_class"]["a"] == pytest.approx(200 / 3)
    assert r["best_threshold"]["a"] == pytest.approx(0.55)
    assert r["mIoU@0.50"] == pytest.approx(50.0)
    m2 = BEVIoUMetric(["a", "b"])
    m2.update(torch.cat([probs, probs], 1), torch.cat([target, 1 - target], 1))
    r2 = m2.compute()
    assert r2["mIoU"] == pytest.approx((r2["per_class"]["a"] + r2["per_class"]["b"]) / 2)


# ------------------------------------------------------------------------------ models


def test_bev_ddp_trains_and_samples():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = build_model(cfg, 6)
    assert isinstance(model, BEVDDP)
    label = (torch.rand(2, 6, 32, 32) > 0.7).to(torch.uint8)
    losses = model(tiny_inputs(), label)
    assert set(losses) == {f"loss_{c}" for c in cfg.data.bev.classes} | {"loss"}
    losses["loss"].backward()
    assert model.view.camera.depthnet.weight.grad.abs().sum() > 0
    assert model.map_encoding.embedding.weight.grad.abs().sum() > 0
    model.eval()
    inputs = tiny_inputs()
    feat = model.extract(inputs)
    assert feat.shape == (2, 32, 20, 20)
    traj = model.sample_steps(feat, 3, randsteps=2, seeds=[5, 6])
    assert len(traj.steps) == 3 and traj.steps[0].shape == (2, 2, 6, 32, 32)
    for acc in (True, False):
        p = traj.output(acc)
        assert p.shape == (2, 6, 32, 32) and float(p.min()) >= 0 and float(p.max()) <= 1
    one = model.sample_steps(feat[1:], 3, randsteps=2, seeds=[6])
    assert torch.allclose(one.output(True), traj.output(True)[1:], atol=1e-5)


def test_bev_trajectory_probabilities_by_hand():
    """Two steps x two starts, one class, one cell; sigmoid(0, ln 3, -ln 3, ln 9) = 0.5, 0.75,
    0.25, 0.9. The official BEV output averages the sigmoid over all steps and starts:
    2.4 / 4 = 0.6; without accumulation, the last step's sigmoid averaged over its starts:
    (0.25 + 0.9) / 2 = 0.575 (not the sigmoid of the mean logit, 0.634)."""
    from densediff.models.interface import Trajectory

    ln3, ln9 = math.log(3), math.log(9)
    step0 = torch.tensor([0.0, ln3]).view(1, 2, 1, 1, 1)  # B x R x K x X x Y
    step1 = torch.tensor([-ln3, ln9]).view(1, 2, 1, 1, 1)
    traj = Trajectory([step0, step1], "multilabel")
    assert float(traj.output(True)) == pytest.approx(0.6)
    assert float(traj.output(False)) == pytest.approx(0.575)
    assert traj.step_outputs().flatten().tolist() == pytest.approx([0.625, 0.575])


def test_bev_targets_and_requantisation():
    model = build_model(tiny_cfg(), 6)
    label = torch.zeros(1, 6, 32, 32)
    label[0, 2, :16] = 1
    y0 = model.encode_target(label, (20, 20))
    assert y0.shape == (1, 16, 20, 20)
    # nearest resampling 32 -> 20 rows: row i reads source row floor(i * 32 / 20), which is
    # < 16 for i < 10. Cells with class 2 set hold the official code: the mean over the K = 6
    # class channels of embedding[c + 1 if set else 0], then sigmoid * 2 - 1, times scale
    emb, scale = model.map_encoding.embedding.weight.detach(), model.map_encoding.scale
    on = ((5 * emb[0] + emb[3]) / 6).sigmoid() * 2 - 1
    off = emb[0].sigmoid() * 2 - 1
    assert torch.allclose(y0[0, :, :10], (scale * on)[:, None, None].expand(16, 10, 20), atol=1e-7)
    assert torch.allclose(y0[0, :, 10:], (scale * off)[:, None, None].expand(16, 10, 20), atol=1e-7)
    assert not torch.allclose(on, off)
    logits = torch.full((1, 6, 32, 32), -3.0)
    logits[0, 2, :16] = 3.0
    assert torch.allclose(model.encode_prediction(logits), y0)


def test_bev_twin_and_lidar_model():
    torch.manual_seed(0)
    twin = build_model(tiny_cfg("model.type=segmentor"), 6)
    assert isinstance(twin, BEVSegmentor)
    probs = twin.eval()(tiny_inputs())
    probs = probs.detach()
    assert probs.shape == (2, 6, 32, 32) and float(probs.min()) >= 0 and float(probs.max()) <= 1
    cl = build_model(tiny_cfg("data.bev.lidar=true"), 6)
    assert cl.view.lidar is not None
    losses = cl(tiny_inputs(points=True), (torch.rand(2, 6, 32, 32) > 0.5).to(torch.uint8))
    losses["loss"].backward()
    assert cl.view.lidar.embed[1].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="points"):
        cl(tiny_inputs(), (torch.rand(2, 6, 32, 32) > 0.5).to(torch.uint8))


def test_bev_config_checks():
    with pytest.raises(ConfigError, match="aux_head"):
        load_config(None, ["task=bev"])
    with pytest.raises(ConfigError, match="ddps"):
        load_config(None, ["task=bev", "model.aux_head.enabled=false", "model.type=ddps",
                           "model.ddps.base=x"])
    with pytest.raises(ConfigError, match="xbound"):
        load_config(None, ["task=bev", "model.aux_head.enabled=false", "data.bev.xbound=[5,1,0.5]"])
    with pytest.raises(ConfigError, match="best_metric"):
        load_config(None, ["task=bev", "model.aux_head.enabled=false", "train.best_metric=abs_rel"])
    for name in ("ddp_c_swin_t", "ddp_cl_swin_t", "twin_c_swin_t", "twin_cl_swin_t"):
        cfg = load_config(f"nuscenes/{name}.yaml")
        assert cfg.data.bev.image_size == (256, 704) and cfg.train.lr == 5e-5
        assert cfg.model.head.num_layers == 5 and cfg.data.bev.lidar == ("cl" in name)
        assert BEVGrid(cfg.data.bev.xbound, cfg.data.bev.ybound).shape == (200, 200)
        assert BEVGrid(cfg.data.bev.feat_xbound, cfg.data.bev.feat_ybound).shape == (128, 128)


def test_cyclic_schedule_follows_mmcv():
    cfg = load_config(None, ["train.lr_schedule=cyclic", "train.warmup_iters=0", "train.iters=100",
                             "train.lr=1.0"]).train
    assert scheduled_lr(1.0, 0, cfg) == pytest.approx(1.0)
    assert scheduled_lr(1.0, 40, cfg) == pytest.approx(10.0)
    assert scheduled_lr(1.0, 20, cfg) == pytest.approx(5.5)  # halfway up the cosine: (1 + 10) / 2
    assert scheduled_lr(1.0, 100, cfg) == pytest.approx(1e-4)
    assert cyclic_ratio(40, 100, (0.85 / 0.95, 1.0)) == pytest.approx(0.85 / 0.95)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0, betas=(0.95, 0.999))
    set_lr(opt, 40, cfg.model_copy(update={"betas": (0.95, 0.999)}))
    assert opt.param_groups[0]["betas"][0] == pytest.approx(0.85)
    assert opt.param_groups[0]["lr"] == pytest.approx(10.0)


# ------------------------------------------------------------------------------ data geometry


# The label grid of the rasteriser tests: X (20 cells of 0.5 m) != Y (32 cells of 0.25 m), so a
# swapped axis or step shows.
RGRID = BEVGrid((-5.0, 5.0, 0.5), (-4.0, 4.0, 0.25))


def _rect(x0, x1, y0, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)


def _cells(x0, x1, y0, y1, grid=RGRID):
    """Mask of the cells [ix, iy] covering [x0, x1) x [y0, y1) (bounds on cell edges)."""
    (sx, sy), (lx, ly) = grid.step, grid.low
    m = np.zeros(grid.shape, np.uint8)
    m[round((x0 - lx) / sx):round((x1 - lx) / sx), round((y0 - ly) / sy):round((y1 - ly) / sy)] = 1
    return m


def _inside_reference(rings, px, py):
    """Slow exact reference: is each point inside the polygon (even-odd ray casting)?"""
    inside = np.zeros(px.shape, bool)
    for ring in rings:
        ring = np.asarray(ring, np.float64)
        for (xa, ya), (xb, yb) in zip(ring, np.roll(ring, -1, 0)):
            crosses = (ya > py) != (yb > py)
            with np.errstate(divide="ignore", invalid="ignore"):
                x = xa + (py - ya) * (xb - xa) / (yb - ya)
            inside ^= crosses & (px < x)
    return inside


def _centroid(mask, grid):
    xs, ys = grid.centres()
    ix, iy = np.nonzero(mask)
    return np.array([xs[ix].mean(), ys[iy].mean()])


def test_rasterize_exact_cells_on_the_grid():
    """Shapes with known extents set exactly the cells of BEVGrid that they cover: cell [ix, iy]
    spans [xlo + ix sx, xlo + (ix + 1) sx) x [ylo + iy sy, ...), x on the first axis."""
    rect = _rect(-1.0, 3.0, 0.5, 2.25)
    ring, hole = _rect(-4.0, -1.5, -3.0, 0.0), _rect(-3.0, -2.0, -2.0, -1.0)
    left, right = _rect(0.0, 2.0, -3.5, -2.0), _rect(2.0, 4.5, -3.5, -2.0)
    geom = MapGeometry({"rect": [(rect, [])], "ring": [(ring, [hole])], "left": [(left, [])],
                        "right": [(right, [])]})
    out = rasterize_map(geom, RGRID, ["rect", "ring", "left", "right", "none"])
    assert out.shape == (5, 20, 32) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], _cells(-1.0, 3.0, 0.5, 2.25))
    assert out[0].sum() == 8 * 7
    np.testing.assert_array_equal(out[1], _cells(-4.0, -1.5, -3.0, 0.0) - _cells(-3.0, -2.0, -2.0, -1.0))
    # shapes sharing an edge: no cell in both, none missing
    assert not (out[2] & out[3]).any()
    np.testing.assert_array_equal(out[2] | out[3], _cells(0.0, 4.5, -3.5, -2.0))
    assert out[4].sum() == 0
    # a cell is labelled where the LiDAR pillars / LSS pooling put the points of that ground
    rng = np.random.default_rng(0)
    pts = rng.uniform([-1.0, 0.5], [3.0, 2.25], (500, 2))
    ix, iy = RGRID.cell_of(torch.tensor(pts[:, 0]), torch.tensor(pts[:, 1]))
    assert out[0][ix.numpy(), iy.numpy()].all()


def test_rasterize_rotated_rectangle_and_map_transform():
    """A rotated rectangle sets exactly the cells whose centre is inside it; moving the map
    (MapGeometry.transformed) moves the label."""
    a, (hu, hv), c = math.radians(30.0), (2.3, 0.9), np.array([0.37, -0.61])
    u, v = np.array([math.cos(a), math.sin(a)]), np.array([-math.sin(a), math.cos(a)])
    rect = c + np.array([[-hu, -hv], [hu, -hv], [hu, hv], [-hu, hv]]) @ np.stack([u, v])
    xs, ys = RGRID.centres()
    xx, yy = np.meshgrid(xs, ys, indexing="ij")
    rel = np.stack([xx - c[0], yy - c[1]], -1)
    expect = (abs(rel @ u) < hu) & (abs(rel @ v) < hv)
    out = rasterize_map(MapGeometry({"a": [(rect, [])]}), RGRID, ["a"])[0]
    np.testing.assert_array_equal(out, expect)
    assert abs(out.sum() * 0.5 * 0.25 - 4 * hu * hv) < 0.5  # area within a few boundary cells
    # rotating the map by +90 degrees about z: the rectangle [2, 3] x [-0.5, 0.5] -> [-0.5, 0.5]
    # x [2, 3]
    rot = np.array([[0.0, -1, 0], [1, 0, 0]])
    r = rasterize_map(MapGeometry({"a": [(_rect(2.0, 3.0, -0.5, 0.5), [])]}).transformed(rot), RGRID,
                      ["a"])
    np.testing.assert_array_equal(r[0], _cells(-0.5, 0.5, 2.0, 3.0))


def test_rasterize_lines_width_and_extent():
    """A line covers the cells within half its width (round caps): an axis-aligned one exactly
    width / step rows (or columns), wherever it lies; DIVIDER_WIDTH is 1.5 m."""
    assert DIVIDER_WIDTH == 1.5
    grid = RGRID
    lines = {"on_edge": [np.array([[-3.0, 1.0], [2.0, 1.0]])],  # y = 1: a cell edge
             "mid": [np.array([[-3.0, 1.125], [2.0, 1.125]])],  # through cell centres
             "along_y": [np.array([[1.0, -3.0], [1.0, 3.0]])]}
    out = rasterize_map(MapGeometry(lines=lines), grid, list(lines), line_width=1.5)
    xs, ys = grid.centres()
    inner = (xs > -3) & (xs < 2)
    # 1.5 m = 6 rows of 0.25 m: the band [0.25, 1.75) of centres, resp. [0.375, 1.875)
    np.testing.assert_array_equal(np.flatnonzero(out[0][inner].any(0)), np.arange(17, 23))
    assert (out[0][inner].sum(1) == 6).all()
    np.testing.assert_array_equal(np.flatnonzero(out[1][inner].any(0)), np.arange(17, 23))
    assert (out[1][inner].sum(1) == 6).all()
    # round caps reach less than width / 2 past the ends
    cols = xs[out[0].any(1)]
    assert cols.min() == -3.25 and cols.max() == 2.25
    # along y: 3 columns of 0.5 m, [0.25, 1.75)
    np.testing.assert_array_equal(np.flatnonzero(out[2].any(1)), [10, 11, 12])
    assert (out[2][:, (ys > -3) & (ys < 3)].sum(0) == 3).all()
    # a line narrower than a cell still sets one
    thin = rasterize_map(MapGeometry(lines={"a": lines["mid"]}), grid, ["a"], line_width=0.1)[0]
    assert (thin[inner].sum(1) == 1).all()


def _random_polygon(rng, centre, radius):
    k = int(rng.integers(3, 12))
    ang = np.sort(rng.uniform(0, 2 * np.pi, k))
    r = rng.uniform(0.3, 1.0, k) * radius
    return centre + np.stack([r * np.cos(ang), r * np.sin(ang)], 1)


def test_rasterize_matches_the_cell_centre_reference():
    """Random polygons (some with a hole) and lines against a slow exact reference: a cell is
    set iff its centre is inside (polygons) / within half the width (lines). Same cells, and no
    shift of the label: its centroid agrees to < 0.05 m (Pillow with the old "-0.5" put it
    0.25 m towards -x and -y)."""
    grid = BEVGrid((-10.0, 10.0, 0.5), (-10.0, 10.0, 0.5))
    xs, ys = grid.centres()
    xx, yy = np.meshgrid(xs, ys, indexing="ij")
    rng = np.random.default_rng(14)
    inter = union = 0
    shift = []
    for i in range(60):
        centre = rng.uniform(-4, 4, 2)
        ext = _random_polygon(rng, centre, rng.uniform(2.0, 6.0))
        # the exterior is star-shaped about the centre: shrunk about it, it gives a hole
        holes = [centre + rng.uniform(0.2, 0.5) * (ext - centre)[::-1]] if i % 3 == 0 else []
        ref = _inside_reference([ext, *holes], xx, yy)
        got = rasterize_map(MapGeometry({"a": [(ext, holes)]}), grid, ["a"])[0].astype(bool)
        inter, union = inter + (got & ref).sum(), union + (got | ref).sum()
        if ref.sum() >= 20:
            shift.append(_centroid(got, grid) - _centroid(ref, grid))
    assert inter / union > 0.999, inter / union
    shift = np.array(shift)
    assert len(shift) > 40 and (abs(shift.mean(0)) < 0.05).all(), shift.mean(0)
    # lines: distance from each centre to the polyline < width / 2
    width, inter, union, shift, area = 1.5, 0, 0, [], []
    for _ in range(40):
        pts = np.cumsum(rng.uniform(-4, 4, (int(rng.integers(2, 5)), 2)), 0)
        pts -= pts.mean(0)
        got = rasterize_map(MapGeometry(lines={"d": [pts]}), grid, ["d"], width)[0].astype(bool)
        dist = np.full(xx.shape, np.inf)
        for p, q in zip(pts[:-1], pts[1:]):
            d = q - p
            t = np.clip(((xx - p[0]) * d[0] + (yy - p[1]) * d[1]) / (d @ d), 0, 1)
            dist = np.minimum(dist, np.hypot(xx - p[0] - t * d[0], yy - p[1] - t * d[1]))
        ref = dist < width / 2
        inter, union = inter + (got & ref).sum(), union + (got | ref).sum()
        shift.append(_centroid(got, grid) - _centroid(ref, grid))
    assert inter / union > 0.99, inter / union
    assert (abs(np.mean(shift, 0)) < 0.05).all(), np.mean(shift, 0)
    # width: a long straight line at any angle covers width x length of ground
    for a in rng.uniform(0, np.pi, 20):
        d = np.array([math.cos(a), math.sin(a)]) * 6.0
        got = rasterize_map(MapGeometry(lines={"d": [np.stack([-d, d])]}), grid, ["d"], width)[0]
        area.append(got.sum() * 0.25 - math.pi * (width / 2) ** 2)  # less the two half caps
    assert abs(np.mean(area) / 12.0 - width) < 0.03, np.mean(area) / 12.0


def test_image_affine_keeps_the_projection_consistent():
    img = np.zeros((90, 160, 3), np.uint8)
    img[60:62, 100:102] = 255  # a bright 2 x 2 patch centred at pixel (101, 61)
    a = image_affine(0.5, (10.0, 5.0), flip_width=64, rotate_deg=3.0, out_size=(32, 64))
    warped = warp_image(Image.fromarray(img), a, (32, 64))
    u, v, _ = a @ np.array([101.0, 61.0, 1.0])
    peak = np.unravel_index(warped[..., 0].argmax(), warped.shape[:2])
    assert abs(peak[1] + 0.5 - u) <= 1.0 and abs(peak[0] + 0.5 - v) <= 1.0
    # intrinsics A @ K project a camera point to where the warp moved its pixel
    k = np.array([[120.0, 0, 80], [0, 120, 45], [0, 0, 1]])
    p = np.array([0.5, 0.3, 4.0])
    assert np.allclose((a @ k @ p)[:2] / p[2], (a @ np.append((k @ p)[:2] / p[2], 1))[:2])


def test_scene_augmentation_moves_cameras_points_and_map_together():
    cfg = load_config(None, ["task=bev", "model.aux_head.enabled=false"]).data.bev
    t = bev_augmentation(cfg, np.random.default_rng(3))
    ego = np.array([12.0, -4.0, 0.0, 1.0])
    cam = np.linalg.inv(cam2ego().numpy()) @ ego  # the point seen by the front camera
    moved = t @ cam2ego().numpy() @ cam
    assert np.allclose(moved, t @ ego)
    geom = MapGeometry({"a": [(np.array([[11.5, -4.5], [12.5, -4.5], [12.5, -3.5], [11.5, -3.5]]), [])]})
    out = geom.transformed(t[[0, 1]][:, [0, 1, 3]])
    centre = out.polygons["a"][0][0].mean(0)
    assert np.allclose(centre, moved[:2])
    assert abs(np.linalg.det(t[:2, :2])) == pytest.approx(t[2, 2] ** 2)


def test_collate_pads_points():
    a = {"image": {"images": torch.zeros(2, 3, 4, 4), "points": torch.ones(3, 5)},
         "label": torch.zeros(6, 2, 2, dtype=torch.uint8), "meta": {}}
    b = {"image": {"images": torch.zeros(2, 3, 4, 4), "points": torch.ones(1, 5)},
         "label": torch.zeros(6, 2, 2, dtype=torch.uint8), "meta": {}}
    batch = collate_bev([a, b])
    assert batch["image"]["points"].shape == (2, 3, 5)
    assert batch["image"]["points_mask"].tolist() == [[True] * 3, [True, False, False]]
    assert batch["label"].shape == (2, 6, 2, 2)


def test_self_aligned_bev_training_noises_its_own_prediction():
    torch.manual_seed(0)
    model = build_model(tiny_cfg("model.diffusion.self_aligned=true"), 6)
    calls = record_denoise(model)
    label = (torch.rand(2, 6, 32, 32) > 0.5).to(torch.uint8)
    losses = model(tiny_inputs(), label)
    assert len(calls) == 2 and torch.isfinite(losses["loss"])
    assert calls[0].out.shape == (2, 6, 32, 32)  # the prediction on the output grid
    # Alg. 4 from pure noise at t = 1: x2 = alpha * y0 + sigma * eps, y0 the encoding of the
    # first call's masks (probability >= 0.5, resampled onto the feature grid), eps the first
    # call's input; not the GT's encoding
    with torch.no_grad():
        gt = model.encode_target(label, tuple(calls[0].x_t.shape[-2:]))
    assert_self_aligned(model, calls, model.encode_prediction, gt, atol=1e-7, gt_atol=1e-5)
