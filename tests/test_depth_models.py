"""Depth models: the depth schedule and encoding, GT downsampling with a valid mask, DepthDDP
training (Alg. 1 with SigLoss) and sampling (Alg. 2 with clamped x0), the twin, the cosine
learning-rate schedule and the task checks of the config."""

from __future__ import annotations

import math

import pytest
import torch

from densediff.diffusion import alpha_sigma
from densediff.diffusion.encodings import DepthEncoding
from densediff.diffusion.schedules import cosine_unclamped_log_snr, get_schedule, schedule_time
from densediff.engine.optim import scheduled_lr
from densediff.errors import ConfigError
from densediff.models import DepthDDP, Depther
from densediff.models.depth import downsample_depth
from densediff.models.interface import Trajectory
from densediff.pipelines.depth import trajectory_spread
from densediff.tasks import build_model, load_config, spec_for
from densediff.testing.spies import assert_self_aligned, record_denoise

SMALL = ["task=depth", "model.type=ddp", "model.head.type=deformable", "model.head.out_kernel=3",
         "model.encoder.variant=tiny", "model.neck.channels=32", "model.neck.num_groups=8",
         "model.head.channels=32", "model.head.num_layers=2", "model.head.ffn_channels=64",
         "model.aux_head.enabled=false", "model.diffusion.scale=0.1",
         "model.diffusion.schedule=cosine_unclamped", "model.diffusion.time_input=t",
         "data.depth.max_depth=10"]


def small(*overrides: str):
    torch.manual_seed(0)
    return build_model(load_config(None, [*SMALL, *overrides]), 1)


def test_unclamped_cosine_is_cos_squared_and_time_inverts_every_schedule():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    theta = (t + 0.0002) / 1.00025 * math.pi / 2
    assert torch.allclose(torch.sigmoid(cosine_unclamped_log_snr(t)), theta.cos() ** 2,
                          atol=1e-12)
    for name in ("cosine_unclamped", "linear"):
        back = schedule_time(name, get_schedule(name)(t.float()))
        assert torch.allclose(back.double(), t, atol=1e-5), name
    # the clamped cosine is invertible where the clamp does not bite (t > 0.003)
    tt = t[t > 0.003].float()
    assert torch.allclose(schedule_time("cosine", get_schedule("cosine")(tt)), tt, atol=1e-5)


def test_depth_encoding_formula_and_inverse():
    enc = DepthEncoding(0.5, 10.5, scale=0.1)
    d = torch.tensor([[[0.5, 5.5, 10.5, 3.0]]])
    code = enc(d)
    assert code.shape == (1, 1, 1, 4)
    expected = ((d - 0.5) / 10 * 2 - 1) * 0.1
    assert torch.allclose(code[:, 0], expected)
    assert torch.allclose(code[0, 0, 0, :3], torch.tensor([-0.1, 0.0, 0.1]))
    assert torch.allclose(enc.decode(code)[:, 0], d)


def test_downsample_depth_uses_valid_pixels_only():
    depth = torch.zeros(1, 8, 8)
    valid = torch.zeros(1, 8, 8, dtype=torch.bool)
    depth[0, 0, 0], valid[0, 0, 0] = 2.0, True    # cell (0, 0) of a 4 x 4 grid (2 x 2 cells)
    depth[0, 1, 1], valid[0, 1, 1] = 4.0, True
    depth[0, 6, 6], valid[0, 6, 6] = 8.0, True    # cell (3, 3)
    depth[0, 7, 0] = 99.0                          # invalid: must never be used
    out = downsample_depth(depth, valid, (4, 4), fallback=-1.0)
    assert out.shape == (1, 1, 4, 4)
    assert out[0, 0, 0, 0] == 3.0                  # mean of the two valid pixels, not of 4
    assert out[0, 0, 3, 3] == 8.0
    # empty cells take the mean of the enclosing 2 x 2 super-cell that has valid pixels
    assert out[0, 0, 0, 1] == 3.0 and out[0, 0, 1, 1] == 3.0
    assert out[0, 0, 2, 3] == 8.0
    # the bottom-left super-cell is empty; the next level (whole image) gives the mean 14/3
    assert torch.isclose(out[0, 0, 3, 0], torch.tensor(14 / 3))
    assert (out != 99.0).all()
    # dense GT: the plain area average; no valid pixel: the fallback
    dense = torch.arange(64.0).view(1, 8, 8)
    avg = torch.nn.functional.avg_pool2d(dense[:, None], 2)
    assert torch.allclose(downsample_depth(dense, torch.ones_like(dense, dtype=torch.bool),
                                           (4, 4), 0.0), avg)
    none = downsample_depth(dense, torch.zeros_like(dense, dtype=torch.bool), (4, 4), 5.0)
    assert (none == 5.0).all()


def test_trajectory_output_and_spread():
    d1, d2 = torch.full((1, 2, 1, 2, 2), 1.0), torch.full((1, 2, 1, 2, 2), 3.0)
    d2[0, 1] = 5.0                                  # two starts at the last step: 3 and 5
    traj = Trajectory([d1, d2], "depth")
    assert torch.allclose(traj.output(False), torch.full((1, 1, 2, 2), 4.0))
    assert torch.allclose(traj.output(True), torch.full((1, 1, 2, 2), 2.5))
    assert torch.allclose(trajectory_spread(traj, "starts"), torch.full((1, 1, 2, 2), 1.0))
    vals = torch.tensor([1.0, 1.0, 3.0, 5.0])
    assert torch.allclose(trajectory_spread(traj, "steps"),
                          vals.std(correction=0).expand(1, 1, 2, 2))
    assert trajectory_spread(Trajectory([d1[:, :1]], "depth"), "steps") is None
    with pytest.raises(ValueError):
        trajectory_spread(traj, "pixels")


def test_depth_ddp_training_step_alg1_with_sigloss_and_t_time_input():
    model = small()
    assert isinstance(model, DepthDDP) and model.map_encoding.channels == 1
    img = torch.randn(2, 3, 64, 64)
    gt = torch.rand(2, 64, 64) * 8 + 1
    gt[:, :, :20] = 0                                # sparse GT: a third has no depth
    seen = {}
    mlp = model.time_mlp.forward
    model.time_mlp.forward = lambda x: seen.setdefault("time", x.detach().clone()) is not None and mlp(x)
    calls = record_denoise(model)
    losses = model.forward_train(img, gt)
    seen["x_t"], seen["log_snr"] = calls[-1].x_t, calls[-1].log_snr
    assert set(losses) == {"loss_depth", "loss"}
    losses["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # the time MLP saw t itself (in [0, 0.999]), i.e. the schedule inverse of the log-SNR
    assert torch.allclose(seen["time"].flatten(), schedule_time("cosine_unclamped",
                                                                seen["log_snr"]), atol=1e-6)
    assert torch.all((seen["time"] >= 0) & (seen["time"] <= 0.999 + 1e-5))
    # y_t = alpha y0 + sigma eps, y0 = the encoded valid-pixel average at 1/4 size
    y0 = model.encode_target(gt, (16, 16))
    assert y0.shape == (2, 1, 16, 16) and y0.abs().max() <= 0.1 + 1e-6
    a, s = (v.view(2, 1, 1, 1) for v in alpha_sigma(seen["log_snr"]))
    eps = (seen["x_t"] - a * y0) / s
    assert abs(float(eps.mean())) < 0.25 and abs(float(eps.std()) - 1) < 0.25


def test_invalid_gt_pixels_change_nothing():
    img = torch.randn(1, 3, 64, 64)
    gt = torch.rand(1, 64, 64) * 8 + 1
    gt[:, 30:40] = 0
    other = gt.clone()
    other[:, 30:40] = 55.0                           # beyond max_depth 10: also invalid
    losses = []
    for g in (gt, other):
        model = small()
        torch.manual_seed(1)
        losses.append(model.forward_train(img, g)["loss"].item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_sampling_clamps_x0_and_returns_every_step():
    model = small().eval()
    feat = model.extract(torch.randn(2, 3, 64, 64))
    clamped = model.encode_prediction(torch.tensor([[[[50.0, -3.0]]]]))
    assert torch.allclose(clamped, torch.tensor([[[[0.1, -0.1]]]]))
    traj = model.sample_steps(feat, 4, seeds=[3, 4])
    assert traj.kind == "depth" and len(traj.steps) == 4
    assert all(d.shape == (2, 1, 1, 16, 16) for d in traj.steps)
    assert all((d >= model.min_depth).all() for d in traj.steps)   # relu + min_depth head
    # per-image seeds: an image gets the same result alone or in a batch
    alone = model.sample_steps(feat[1:], 4, seeds=[4])
    assert torch.allclose(alone.steps[-1][0], traj.steps[-1][1], atol=1e-5)
    out = model.predict_map(torch.randn(1, 3, 64, 48), steps=2)
    assert out.shape == (1, 1, 64, 48)


def test_twin_trains_and_predicts_depth():
    model = small("model.type=segmentor", "model.aux_head.enabled=true", "model.aux_head.channels=16")
    assert isinstance(model, Depther)
    img, gt = torch.randn(2, 3, 32, 32), torch.rand(2, 32, 32) * 5 + 1
    losses = model.forward_train(img, gt)
    assert set(losses) == {"loss_depth", "loss_aux", "loss"}
    assert torch.isclose(losses["loss"], losses["loss_depth"] + losses["loss_aux"])
    assert model.head.conv_seg.kernel_size == (3, 3)
    model.eval()
    assert model(img).shape == (2, 1, 32, 32) and (model(img) >= 1e-3).all()


def test_gradient_loss_term_is_added_with_its_weight():
    """``loss_grad`` = weight x the unweighted gradient loss, and it is part of ``loss``: the
    same model and input at weights 0.5 and 2 give loss_grad in the ratio 4 and an equal
    SigLoss; at weight 0 the term is absent."""
    img, gt = torch.randn(2, 3, 32, 32), torch.rand(2, 32, 32) * 5 + 1
    out = {}
    for w in (0.0, 0.5, 2.0):
        model = small("model.type=segmentor", f"model.depth_loss.gradient_weight={w}").eval()
        out[w] = model.forward_train(img, gt)  # eval mode: no dropout, the same prediction
    assert set(out[0.0]) == {"loss_depth", "loss"}
    assert set(out[0.5]) == set(out[2.0]) == {"loss_depth", "loss_grad", "loss"}
    assert float(out[0.5]["loss_grad"].detach()) > 0
    assert torch.allclose(out[2.0]["loss_grad"], 4 * out[0.5]["loss_grad"], rtol=1e-5)
    assert torch.allclose(out[0.5]["loss_depth"], out[0.0]["loss_depth"])
    for w in (0.5, 2.0):
        assert torch.allclose(out[w]["loss"], out[w]["loss_depth"] + out[w]["loss_grad"])


def test_cosine_lr_schedule_formula():
    cfg = load_config(None, ["train.lr_schedule=cosine", "train.iters=100", "train.lr=1.0",
                             "train.warmup_iters=10", "train.warmup_ratio=0.001",
                             "train.min_lr=0.0"]).train
    assert scheduled_lr(1.0, 50, cfg) == pytest.approx(0.5)
    assert scheduled_lr(1.0, 25, cfg) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert scheduled_lr(1.0, 0, cfg) == pytest.approx(0.001)          # warmup start
    w = (1 + math.cos(math.pi * 5 / 100)) / 2
    assert scheduled_lr(1.0, 5, cfg) == pytest.approx(w * (1 - 0.5 * 0.999))


@pytest.mark.parametrize("overrides, key", [
    (["task=depth", "data.dataset=camvid"], "not a depth dataset"),
    (["data.dataset=kitti"], "not a segmentation dataset"),
    (["task=depth", "train.best_metric=mIoU"], "not a depth metric"),
    (["task=depth", "data.train_pipeline.scale=[64,64]"], "train_pipeline.scale"),
    (["task=depth", "data.depth.min_depth=5", "data.depth.max_depth=1"], "min_depth"),
    (["task=depth", "model.type=ddps", "model.ddps.base=x"], "not a depth model"),
])
def test_config_task_checks(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, overrides)


def test_depth_best_metric_defaults_to_abs_rel():
    cfg = load_config(None, ["task=depth"])
    assert spec_for(cfg).best_metric(cfg) == "abs_rel"
    cfg = load_config(None, [])
    assert spec_for(cfg).best_metric(cfg) == "mIoU"


def test_output_bias_starts_mid_range_so_relu_is_alive():
    for model in (small(), small("model.type=segmentor")):
        head = model.decoder if isinstance(model, DepthDDP) else model.head
        assert torch.allclose(head.conv_seg.bias, torch.tensor([(1e-3 + 10) / 2]))
        model.eval()
        out = model(torch.randn(1, 3, 32, 32))
        assert (out > 1e-3).float().mean() > 0.9          # almost no pixel starts dead


def test_self_aligned_depth_noises_the_models_own_clamped_prediction():
    model = small("model.diffusion.self_aligned=true")
    calls = record_denoise(model)
    gt = torch.rand(2, 64, 64) * 8 + 1
    losses = model.forward_train(torch.randn(2, 3, 64, 64), gt)
    assert len(calls) == 2 and torch.isfinite(losses["loss"])
    # the first call is Alg. 4's prediction from pure noise at t = 1; its depth, encoded
    # (depth / max scaled to +-0.1) and clamped to [-0.1, 0.1], is the y0 of the second input:
    # x2 = alpha * y0 + sigma * eps with eps the first input
    enc = model.map_encoding

    def encoded(depth):
        return (((depth - enc.min_depth) / (enc.max_depth - enc.min_depth) * 2 - 1) * 0.1
                ).clamp(-0.1, 0.1)

    assert_self_aligned(model, calls, encoded, model.encode_target(gt, (16, 16)), atol=1e-6,
                        gt_atol=1e-4)
