"""Depth losses, metrics and uncertainty: hand-computed cases, numpy / slow-loop references and
the distributed reduction."""

from __future__ import annotations

import json
import math
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from densediff.criteria.depth import (
    METRIC_KEYS,
    DepthMetric,
    DepthUncertaintyMetric,
    depth_errors,
    depth_spread,
    eval_crop_mask,
    format_depth_metrics,
    gradient_loss,
    sig_loss,
    sparsification_curves,
    valid_mask,
)

D = torch.float64
GT3 = [1.0, 2.0, 4.0]
PRED3 = [1.1, 1.5, 5.0]


def _hand3() -> dict:
    """The metrics of gt = [1, 2, 4], pred = [1.1, 1.5, 5], written out.

    max ratios 1.1, 4/3, 1.25 (not < 1.25: strict); |d| = 0.1, 0.5, 1; e = log(1.1), log(0.75),
    log(1.25).
    """
    e = [math.log(1.1), math.log(0.75), math.log(1.25)]
    me = sum(e) / 3
    me2 = sum(x * x for x in e) / 3
    return {
        "d1": 1 / 3, "d2": 1.0, "d3": 1.0,
        "abs_rel": (0.1 / 1 + 0.5 / 2 + 1 / 4) / 3,  # 0.2
        "sq_rel": (0.01 / 1 + 0.25 / 2 + 1 / 4) / 3,  # 0.385 / 3
        "rmse": math.sqrt((0.01 + 0.25 + 1) / 3),  # sqrt(0.42)
        "rmse_log": math.sqrt(me2),
        "log10": (abs(math.log10(1.1)) + abs(math.log10(0.75)) + abs(math.log10(1.25))) / 3,
        "silog": 100 * math.sqrt(me2 - me * me),
    }


def _close(got: dict, exp: dict, tol: float = 1e-9) -> None:
    for k, v in exp.items():
        assert math.isclose(got[k], v, rel_tol=tol, abs_tol=tol), (k, got[k], v)


# ---------------------------------------------------------------------------- depth_errors


def test_depth_errors_hand_values():
    got = depth_errors(torch.tensor(PRED3, dtype=D), torch.tensor(GT3, dtype=D))
    assert list(got) == list(METRIC_KEYS)
    exp = _hand3()
    assert math.isclose(exp["abs_rel"], 0.2) and math.isclose(exp["rmse"], math.sqrt(0.42))
    _close(got, exp)
    # float32 input gives the same numbers (computed in float64) up to float32 input rounding
    _close(depth_errors(torch.tensor(PRED3), torch.tensor(GT3)), exp, tol=1e-6)


def test_depth_errors_thresholds_and_silog_scale_invariance():
    gt = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=D)
    got = depth_errors(gt * 1.3, gt)  # ratio 1.3: fails d1, passes d2 = 1.5625
    assert got["d1"] == 0.0 and got["d2"] == 1.0
    assert math.isclose(got["abs_rel"], 0.3)
    assert got["silog"] == pytest.approx(0.0, abs=1e-5)  # clamped at 0, never NaN
    assert not math.isnan(got["silog"])
    assert math.isclose(got["rmse_log"], math.log(1.3))
    assert all(math.isnan(v) for v in depth_errors(torch.zeros(0), torch.zeros(0)).values())
    with pytest.raises(ValueError):
        depth_errors(torch.ones(2, 2), torch.ones(2, 2))


# ---------------------------------------------------------------------------- masks / crops


def test_valid_mask_strict_bounds_and_nonfinite():
    gt = torch.tensor([0.0, 1e-3, 0.5, 80.0, 79.9, float("nan"), float("inf"), 81.0])
    got = valid_mask(gt, 1e-3, 80.0)
    assert got.tolist() == [False, False, True, False, True, False, False, False]


def _bounds(mask: torch.Tensor) -> tuple[int, int, int, int]:
    rows = mask.any(1).nonzero().flatten()
    cols = mask.any(0).nonzero().flatten()
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    box = torch.zeros_like(mask)
    box[r0:r1, c0:c1] = True
    assert torch.equal(mask, box)  # a full rectangle
    return r0, r1, c0, c1


def test_crops_kitti_and_nyu_bounds():
    assert _bounds(eval_crop_mask(375, 1242, "garg")) == (153, 371, 44, 1197)
    assert _bounds(eval_crop_mask(375, 1242, "eigen")) == (124, 342, 44, 1197)
    assert _bounds(eval_crop_mask(352, 1216, "garg")) == (143, 349, 43, 1172)  # after KB crop
    assert _bounds(eval_crop_mask(480, 640, "nyu_eigen")) == (45, 471, 41, 601)
    assert _bounds(eval_crop_mask(240, 320, "nyu_eigen")) == (22, 235, 20, 300)
    none = eval_crop_mask(4, 5, "none")
    assert none.shape == (4, 5) and bool(none.all()) and none.dtype == torch.bool
    with pytest.raises(ValueError):
        eval_crop_mask(4, 5, "kb")


# ---------------------------------------------------------------------------- sig_loss


def _np_sig(pred, gt, valid, lam=0.15, eps=1e-3):
    g = np.log(pred[valid] + eps) - np.log(gt[valid] + eps)
    return math.sqrt(np.var(g, ddof=1) + lam * np.mean(g) ** 2)


def test_sig_loss_matches_numpy_and_ignores_invalid():
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(2, 1, 5, 6, generator=g, dtype=D) * 10 + 0.5
    pred = torch.rand(2, 1, 5, 6, generator=g, dtype=D) * 10 + 0.5
    gt[0, 0, 0, :3] = 0.0  # no measurement
    valid = gt > 0
    valid[1, 0, 4, 5] = False  # masked by the caller
    exp = _np_sig(pred.numpy(), gt.numpy(), valid.numpy())
    got = sig_loss(pred, gt, valid)
    assert got.dim() == 0 and math.isclose(float(got), exp, rel_tol=1e-12)
    # hand case: g = log(2), log(2), log(1/2) -> var (ddof 1) = 3 log(2)^2 ... written out
    l2 = math.log(2)
    hand = math.sqrt(((l2 - l2 / 3) ** 2 * 2 + (-l2 - l2 / 3) ** 2) / 2 + 0.15 * (l2 / 3) ** 2)
    t = sig_loss(torch.tensor([2.0, 4.0, 1.0], dtype=D), torch.tensor([1.0, 2.0, 2.0], dtype=D),
                 torch.ones(3, dtype=torch.bool), eps=0.0)
    assert math.isclose(float(t), hand, rel_tol=1e-12)
    # changing an invalid pixel's prediction changes nothing
    pred2 = pred.clone()
    pred2[0, 0, 0, 0] = 123.0
    pred2[1, 0, 4, 5] = 1e-6
    assert float(sig_loss(pred2, gt, valid)) == float(got)
    # valid=None is the official gt > 0 mask
    assert math.isclose(float(sig_loss(pred, gt)), _np_sig(pred.numpy(), gt.numpy(),
                                                           (gt > 0).numpy()), rel_tol=1e-12)
    # pooled over the batch, not averaged per image
    per_img = np.mean([_np_sig(pred[i].numpy(), gt[i].numpy(), valid[i].numpy()) for i in (0, 1)])
    assert not math.isclose(float(got), per_img, rel_tol=1e-6)


def test_sig_loss_gradient_finite_when_g_constant():
    gt = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    valid = torch.ones(2, 2, dtype=torch.bool)
    for factor in (1.0, 2.0):  # g all 0 (loss argument 0) and g all log 2
        pred = (gt * factor).requires_grad_()
        loss = sig_loss(pred, gt, valid, eps=0.0)
        loss.backward()
        assert torch.isfinite(pred.grad).all()
        if factor == 1.0:
            assert float(loss.detach()) <= 1e-6 and torch.equal(pred.grad, torch.zeros_like(gt))
        else:
            assert math.isclose(float(loss.detach()), math.sqrt(0.15) * math.log(2), rel_tol=1e-5)


def test_sig_loss_no_valid_pixel_and_single_pixel():
    pred = torch.rand(1, 3, 3, requires_grad=True)
    gt = torch.zeros(1, 3, 3)
    loss = sig_loss(pred, gt, gt > 0)
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))
    one = torch.zeros(1, 3, 3, dtype=torch.bool)
    one[0, 1, 1] = True
    gt1 = torch.full((1, 3, 3), 2.0)
    val = sig_loss(torch.full((1, 3, 3), 4.0), gt1, one, eps=0.0)  # variance term 0, not NaN
    assert math.isclose(float(val), math.sqrt(0.15) * math.log(2), rel_tol=1e-6)
    with pytest.raises(ValueError):
        sig_loss(torch.ones(1, 1, 3, 3), torch.ones(1, 3, 3), torch.ones(1, 3, 3, dtype=torch.bool))


# ---------------------------------------------------------------------------- gradient_loss


def _from_residual(r: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """pred, gt (1 x 1 x H x W) whose log residual (eps = 0) is ``r``."""
    gt = torch.full((1, 1, len(r), len(r[0])), 2.0, dtype=D)
    return gt * torch.tensor(r, dtype=D).exp(), gt


def test_gradient_loss_hand_values_and_masking():
    pred, gt = _from_residual([[0, 1, 1], [0, 0, 2]])
    ones = torch.ones_like(gt, dtype=torch.bool)
    # scale 0: x pairs 1 + 0 + 0 + 2, y pairs 0 + 1 + 1 -> 5 / 6 pixels
    assert math.isclose(float(gradient_loss(pred, gt, ones, scales=1, eps=0.0)), 5 / 6)
    # scale 1 (stride 2): [[0, 1]] -> 1 / 2 pixels; scales are summed
    assert math.isclose(float(gradient_loss(pred, gt, ones, scales=2, eps=0.0)), 5 / 6 + 1 / 2)
    # pixel (1, 2) invalid: scale 0 keeps x 1 + 0 + 0 and y 0 + 1 -> 2 / 5 pixels
    valid = ones.clone()
    valid[..., 1, 2] = False
    assert math.isclose(float(gradient_loss(pred, gt, valid, scales=2, eps=0.0)), 2 / 5 + 1 / 2)
    # an invalid pixel's values are irrelevant, and its gradient is zero (not NaN)
    pred2 = pred.clone()
    pred2[..., 1, 2] = 0.0
    gt2 = gt.clone()
    gt2[..., 1, 2] = 0.0
    pred2.requires_grad_()
    loss = gradient_loss(pred2, gt2, valid, scales=2, eps=0.0)
    assert math.isclose(float(loss.detach()), 2 / 5 + 1 / 2)
    loss.backward()
    assert torch.isfinite(pred2.grad).all() and float(pred2.grad[..., 1, 2]) == 0.0


def test_gradient_loss_constant_ratio_is_zero_else_positive():
    g = torch.Generator().manual_seed(1)
    gt = torch.rand(2, 16, 16, generator=g, dtype=D) * 20 + 1
    valid = torch.rand(2, 16, 16, generator=g) < 0.8
    assert float(gradient_loss(gt * 3.7, gt, valid, eps=0.0)) == pytest.approx(0.0, abs=1e-12)
    noisy = gt * (1 + 0.1 * torch.rand(2, 16, 16, generator=g, dtype=D))
    assert float(gradient_loss(noisy, gt, valid)) > 1e-3
    empty = torch.zeros_like(valid)
    p = noisy.clone().requires_grad_()
    z = gradient_loss(p, gt, empty)
    assert float(z.detach()) == 0.0 and z.requires_grad


# ---------------------------------------------------------------------------- DepthMetric


def test_depth_metric_single_image_hand_values():
    m = DepthMetric(1e-3, 80)
    m.update(torch.tensor([PRED3]), torch.tensor([GT3]))  # 1 x 1 x 3 (B x H x W)
    got = m.compute()
    _close(got, _hand3(), tol=1e-6)
    assert got["images"] == 1 and got["skipped"] == 0


def test_depth_metric_averages_images_not_pixels():
    # image A: 1 pixel (pred 2, gt 1: abs_rel 1), image B: the 3-pixel hand case (abs_rel 0.2)
    pred_a, gt_a = torch.tensor([[2.0]], dtype=D), torch.tensor([[1.0]], dtype=D)
    pred_b, gt_b = torch.tensor([PRED3], dtype=D), torch.tensor([GT3], dtype=D)
    m = DepthMetric(1e-3, 80)
    m.update([pred_a, pred_b], [gt_a, gt_b])
    got = m.compute()
    assert math.isclose(got["abs_rel"], (1.0 + 0.2) / 2)  # pooled would be (1 + 0.6) / 4 = 0.4
    assert math.isclose(got["d1"], (0.0 + 1 / 3) / 2)
    assert math.isclose(got["rmse"], (1.0 + math.sqrt(0.42)) / 2)
    assert got["images"] == 2
    # two updates == one
    m2 = DepthMetric(1e-3, 80)
    m2.update([pred_a], [gt_a])
    m2.update(pred_b[None], gt_b[None])
    assert m2.compute() == got


def test_depth_metric_caps_clamps_and_skips():
    m = DepthMetric(0.5, 10.0)
    gt = torch.tensor([[[0.5, 10.0, 0.0, float("nan"), 2.0, 4.0, 5.0, 1.0]]])  # first 4 invalid
    pred = torch.tensor([[[7.0, 7.0, 7.0, 7.0, 20.0, float("inf"), float("nan"), 0.1]]])
    m.update(pred, gt)
    # evaluated: gt 2, 4, 5, 1 vs pred clamped 10, 10 (inf), 0.5 (nan), 0.5 (0.1)
    p = torch.tensor([10.0, 10.0, 0.5, 0.5], dtype=D)
    t = torch.tensor([2.0, 4.0, 5.0, 1.0], dtype=D)
    _close(m.compute(), depth_errors(p, t))
    # an image without valid pixel is skipped and counted; the mean is unchanged
    m.update(torch.ones(1, 1, 8), torch.zeros(1, 1, 8))
    got = m.compute()
    assert got["images"] == 1 and got["skipped"] == 1
    _close(got, depth_errors(p, t))
    empty = DepthMetric(1e-3, 80)
    empty.update(torch.ones(1, 2, 2), torch.zeros(1, 2, 2))
    res = empty.compute()
    assert all(math.isnan(res[k]) for k in METRIC_KEYS) and res["images"] == 0
    with pytest.raises(ValueError):
        DepthMetric(0.0, 80)
    with pytest.raises(ValueError):
        DepthMetric(1e-3, 80, crop="kb")
    with pytest.raises(ValueError):
        m.update(torch.ones(1, 2, 3), torch.ones(1, 3, 2))


def test_depth_metric_crop_is_applied():
    g = torch.Generator().manual_seed(2)
    gt = torch.rand(1, 48, 64, generator=g, dtype=D) * 9 + 0.5
    pred = torch.rand(1, 48, 64, generator=g, dtype=D) * 9 + 0.5
    m = DepthMetric(1e-3, 10, crop="nyu_eigen")
    m.update(pred, gt)
    r0, r1, c0, c1 = 4, 47, 4, 60  # 45 * 48 // 480, 471 * 48 // 480, 41 * 64 // 640, 601 // 10
    exp = depth_errors(pred[0, r0:r1, c0:c1].flatten(), gt[0, r0:r1, c0:c1].flatten())
    _close(m.compute(), exp)
    full = DepthMetric(1e-3, 10)
    full.update(pred, gt)
    assert not math.isclose(full.compute()["abs_rel"], exp["abs_rel"], rel_tol=1e-9)


def test_format_depth_metrics():
    m = DepthMetric(1e-3, 80)
    m.update(torch.tensor([PRED3]), torch.tensor([GT3]))
    text = format_depth_metrics(json.loads(json.dumps(m.compute())))
    lines = text.splitlines()
    assert len(lines) == 3
    assert [c.strip() for c in lines[0].split(" | ")] == [*METRIC_KEYS, "images"]
    assert "0.2000" in lines[2] and "0.3333" in lines[2] and lines[2].endswith("1")
    assert m.format_table() == text
    nan_text = format_depth_metrics(DepthMetric(1e-3, 80).compute())
    assert "nan" in nan_text


# ---------------------------------------------------------------------------- uncertainty


def test_depth_spread_population_std():
    g = torch.Generator().manual_seed(3)
    s = torch.rand(5, 2, 3, 4, generator=g)
    got = depth_spread(s)
    assert got.shape == (2, 3, 4)
    np.testing.assert_allclose(got.numpy(), s.numpy().std(0, ddof=0), rtol=1e-5, atol=1e-7)
    hand = depth_spread([torch.tensor([1.0]), torch.tensor([3.0])])
    assert float(hand) == 1.0  # population: sqrt(((1-2)^2 + (3-2)^2) / 2)
    assert torch.equal(depth_spread(s[:1]), torch.zeros(2, 3, 4))


def _slow_curves(u, p, g, fractions):
    """Loop reference: remove ceil(k (n - 1) / F) pixels by explicit ranking, per fraction."""
    u, p, g = (x.double().numpy() for x in (u, p, g))
    n = len(u)
    rel, sq = np.abs(p - g) / g, (p - g) ** 2
    out = {k: [] for k in ("abs_rel", "abs_rel_oracle", "rmse", "rmse_oracle")}
    for k in range(fractions):
        r = math.ceil(k * (n - 1) / fractions)
        keep_u = np.argsort(-u, kind="stable")[r:]
        out["abs_rel"].append(rel[keep_u].mean())
        out["rmse"].append(math.sqrt(sq[keep_u].mean()))
        out["abs_rel_oracle"].append(np.sort(rel)[::-1][r:].mean())
        out["rmse_oracle"].append(math.sqrt(np.sort(sq)[::-1][r:].mean()))
    return out


def _poggi_ause(gt, pred, uncert, intervals):
    """Poggi et al.'s compute_aucs (percentile thresholds, np.trapz), abs_rel and rmse only."""
    uncert = -uncert
    true = {"abs_rel": -np.abs(gt - pred) / gt, "rmse": -(gt - pred) ** 2}

    def metric(m, mask):
        if m == "abs_rel":
            return np.mean(np.abs(gt[mask] - pred[mask]) / gt[mask])
        return np.sqrt(np.mean((gt[mask] - pred[mask]) ** 2))

    quants = [100.0 / intervals * t for t in range(intervals)]
    plotx = np.array([1.0 / intervals * t for t in range(intervals + 1)])
    out = {}
    for m in ("abs_rel", "rmse"):
        sparse = [metric(m, uncert >= np.percentile(uncert, q)) for q in quants] + [0]
        opt = [metric(m, true[m] >= np.percentile(true[m], q)) for q in quants] + [0]
        trapz = lambda y: float(np.sum((np.array(y[1:]) + np.array(y[:-1])) / 2 * np.diff(plotx)))
        out[m] = trapz(sparse) - trapz(opt)
    return out


def test_sparsification_curves_match_slow_loop_and_poggi():
    g = torch.Generator().manual_seed(4)
    gt = torch.rand(6, 13, generator=g, dtype=D) * 9 + 1  # n = 78: k (n-1) / F never integer
    pred = gt * (1 + 0.3 * torch.randn(6, 13, generator=g, dtype=D)).clamp(min=0.2)
    u = torch.rand(6, 13, generator=g, dtype=D)
    for fractions in (20, 7):
        got = sparsification_curves(u.flatten(), pred.flatten(), gt.flatten(), fractions)
        ref = _slow_curves(u.flatten(), pred.flatten(), gt.flatten(), fractions)
        for k, v in ref.items():
            np.testing.assert_allclose(got[k].numpy(), np.array(v), rtol=1e-12)
        assert torch.all(got["abs_rel"] >= got["abs_rel_oracle"] - 1e-12)
    m = DepthUncertaintyMetric(1e-3, 80, fractions=20)
    m.update(u[None], pred[None], gt[None])
    res = m.compute()
    poggi = _poggi_ause(gt.flatten().numpy(), pred.flatten().numpy(), u.flatten().numpy(), 20)
    assert math.isclose(res["ause_abs_rel"], poggi["abs_rel"], rel_tol=1e-9)
    assert math.isclose(res["ause_rmse"], poggi["rmse"], rel_tol=1e-9)
    # AUSE is the mean over fractions of curve - oracle
    c = sparsification_curves(u.flatten(), pred.flatten(), gt.flatten(), 20)
    assert math.isclose(res["ause_abs_rel"], float((c["abs_rel"] - c["abs_rel_oracle"]).mean()),
                        rel_tol=1e-9)


def test_ause_perfect_zero_random_positive():
    g = torch.Generator().manual_seed(5)
    gt = torch.rand(2, 12, 12, generator=g, dtype=D) * 9 + 1
    pred = gt * (1 + 0.3 * torch.rand(2, 12, 12, generator=g, dtype=D))
    perfect_rel = (pred - gt).abs() / gt
    perfect_abs = (pred - gt).abs()
    m = DepthUncertaintyMetric(1e-3, 80)
    m.update(perfect_rel, pred, gt)
    assert m.compute()["ause_abs_rel"] == pytest.approx(0.0, abs=1e-12)
    m = DepthUncertaintyMetric(1e-3, 80)
    m.update(perfect_abs, pred, gt)
    assert m.compute()["ause_rmse"] == pytest.approx(0.0, abs=1e-12)
    m = DepthUncertaintyMetric(1e-3, 80)
    m.update(torch.rand(2, 12, 12, generator=g, dtype=D), pred, gt)
    res = m.compute()
    assert res["ause_abs_rel"] > 1e-3 and res["ause_rmse"] > 1e-3 and res["images"] == 2
    # normalize=True divides by the full-image value (one image)
    one_u = torch.rand(1, 12, 12, generator=g, dtype=D)
    raw = DepthUncertaintyMetric(1e-3, 80)
    raw.update(one_u, pred[:1], gt[:1])
    nrm = DepthUncertaintyMetric(1e-3, 80, normalize=True)
    nrm.update(one_u, pred[:1], gt[:1])
    full = depth_errors(pred[0].flatten(), gt[0].flatten())
    assert math.isclose(nrm.compute()["ause_abs_rel"], raw.compute()["ause_abs_rel"]
                        / full["abs_rel"], rel_tol=1e-9)
    assert math.isclose(nrm.compute()["ause_rmse"], raw.compute()["ause_rmse"] / full["rmse"],
                        rel_tol=1e-9)


def test_pearson_matches_numpy_over_valid_pixels():
    g = torch.Generator().manual_seed(6)
    gt = torch.rand(2, 7, 9, generator=g, dtype=D) * 9 + 1
    gt[0, 0, :4] = 0.0  # invalid
    gt[1, 3, 3] = 100.0  # above max: invalid
    pred = gt * (1 + 0.4 * torch.rand(2, 7, 9, generator=g, dtype=D))
    u = (pred - gt).abs() / gt + 0.1 * torch.rand(2, 7, 9, generator=g, dtype=D)
    m = DepthUncertaintyMetric(1e-3, 80)
    m.update(u[:1], pred[:1], gt[:1])  # two updates
    m.update(u[1:], pred[1:], gt[1:])
    valid = (gt > 1e-3) & (gt < 80)
    err = ((pred - gt).abs() / gt)[valid].numpy()
    exp = np.corrcoef(u[valid].numpy(), err)[0, 1]
    res = m.compute()
    assert math.isclose(res["pearson"], exp, rel_tol=1e-9) and 0.5 < exp < 1.0
    assert res["images"] == 2
    const = DepthUncertaintyMetric(1e-3, 80)
    const.update(torch.full((1, 3, 3), 0.3), gt[:1, :3, 4:7], gt[:1, :3, 4:7] * 1.1)
    assert math.isnan(const.compute()["pearson"])
    empty = DepthUncertaintyMetric(1e-3, 80)
    empty.update(torch.ones(1, 2, 2), torch.ones(1, 2, 2), torch.zeros(1, 2, 2))
    r = empty.compute()
    assert r["images"] == 0 and r["skipped"] == 1 and math.isnan(r["ause_rmse"])
    with pytest.raises(ValueError):
        m2 = DepthUncertaintyMetric(1e-3, 80)
        m2.update(torch.full((1, 2, 2), float("nan")), torch.ones(1, 2, 2), torch.ones(1, 2, 2))


def test_merge_state_equals_one_metric_over_all_data():
    g = torch.Generator().manual_seed(11)
    data = []
    for _ in range(2):
        gt = torch.rand(2, 5, 6, generator=g, dtype=D) * 9 + 1
        gt[0, 0] = 0  # invalid pixels
        pred = gt * (1 + 0.3 * torch.rand(2, 5, 6, generator=g, dtype=D))
        data.append((torch.rand(2, 5, 6, generator=g, dtype=D), pred, gt))
    data[1][2][1] = 0  # an image without evaluated pixels: skipped
    whole = DepthMetric(1e-3, 80), DepthUncertaintyMetric(1e-3, 80)
    parts = [(DepthMetric(1e-3, 80), DepthUncertaintyMetric(1e-3, 80)) for _ in data]
    for (u, p, gt), (dm, um) in zip(data, parts):
        for d, m in zip((dm, whole[0]), (um, whole[1])):
            d.update(p, gt)
            m.update(u, p, gt)
    for i in range(2):
        parts[0][i].merge_state(parts[1][i])
        for k, v in whole[i].compute().items():
            assert parts[0][i].compute()[k] == pytest.approx(v, rel=1e-12, nan_ok=True), k
    assert whole[0].compute()["skipped"] == 1


def test_one_metric_list_and_explicit_lower_is_better():
    from densediff.tasks import TASKS

    depth = TASKS["depth"]
    assert depth.metrics is METRIC_KEYS  # the task table reads the metric module's list
    assert {k for k in METRIC_KEYS if k not in depth.lower_is_better} == {"d1", "d2", "d3"}


# ---------------------------------------------------------------------------- distributed


def _dist_worker(rank, world, init_file, data, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        u, p, g = data[rank]
        dm = DepthMetric(1e-3, 80)
        um = DepthUncertaintyMetric(1e-3, 80)
        dm.update(p, g)
        um.update(u, p, g)
        for m in (dm, um):
            m.reduce()
            m.reduce()  # second call must not double-count
        torch.save({"d": dm.compute(), "u": um.compute()}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_reduce_sums_over_processes():
    g = torch.Generator().manual_seed(7)
    data = []
    for _ in range(2):
        gt = torch.rand(2, 5, 6, generator=g, dtype=D) * 9 + 1
        pred = gt * (1 + 0.3 * torch.rand(2, 5, 6, generator=g, dtype=D))
        data.append((torch.rand(2, 5, 6, generator=g, dtype=D), pred, gt))
    dm, um = DepthMetric(1e-3, 80), DepthUncertaintyMetric(1e-3, 80)
    for u, p, gt in data:
        dm.update(p, gt)
        um.update(u, p, gt)
    dm.reduce()  # no-op without a process group
    um.reduce()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_dist_worker, args=(2, os.path.join(tmp, "init"), data, tmp), nprocs=2,
                 join=True)
        for rank in range(2):
            got = torch.load(os.path.join(tmp, f"{rank}.pt"))
            for k, v in dm.compute().items():
                assert got["d"][k] == pytest.approx(v, rel=1e-12), k
            for k, v in um.compute().items():
                assert got["u"][k] == pytest.approx(v, rel=1e-12), k


def test_best_constant_depth_is_the_abs_rel_minimiser():
    from densediff.criteria.depth import best_constant_depth

    gen = torch.Generator().manual_seed(0)
    gts = [torch.rand(1, 6, 7, generator=gen) * 8 + 0.5, torch.rand(1, 4, 5, generator=gen) * 3 + 1]
    gts[0][0, 0, :3] = 0                                   # invalid pixels are left out
    c, m = best_constant_depth(gts, 1e-3, 10.0)

    def abs_rel(x):
        metric = DepthMetric(1e-3, 10.0)
        for g in gts:
            metric.update(torch.full_like(g, x), g)
        return metric.compute()["abs_rel"]

    assert m["abs_rel"] == pytest.approx(abs_rel(c))
    grid = torch.linspace(0.5, 9.0, 800).tolist()      # no constant on a fine grid does better
    assert m["abs_rel"] <= min(abs_rel(x) for x in grid) + 1e-9
