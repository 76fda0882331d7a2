"""Uncertainty estimators and UncertaintyMetric: hand cases, exact rank/sort references,
torchmetrics, and the distributed reduction."""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from densediff.criteria.uncertainty import (
    UncertaintyMetric,
    entropy_uncertainty,
    step_change_uncertainty,
)

try:
    from torchmetrics.functional.classification import binary_auroc
except ImportError:  # pragma: no cover
    binary_auroc = None


# ---------------------------------------------------------------------------- references


def _rank_auroc(u: torch.Tensor, wrong: torch.Tensor) -> float:
    """Exact AUROC (fraction) via the Mann-Whitney U statistic with average ranks for ties."""
    x = u.double().flatten().numpy()
    pos = wrong.flatten().numpy()
    order = np.argsort(x, kind="stable")
    xs = x[order]
    ranks = np.empty(len(x))
    i = 0
    while i < len(xs):  # average 1-based rank over each run of equal values
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n1, n0 = int(pos.sum()), int((~pos).sum())
    return (ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)


def _pairwise_auroc(u: torch.Tensor, wrong: torch.Tensor) -> float:
    """Exact AUROC (fraction) by comparing every (wrong, right) pair, ties 1/2."""
    a = u[wrong].double()[:, None]
    b = u[~wrong].double()[None, :]
    return float(((a > b).double() + 0.5 * (a == b).double()).mean())


def _sort_err_top(u: torch.Tensor, wrong: torch.Tensor, frac: float) -> float:
    """Error rate (percent) among the round(frac * N) largest values (no ties at the cut)."""
    n_top = round(frac * u.numel())
    order = torch.argsort(u.flatten(), descending=True, stable=True)
    return 100 * float(wrong.flatten()[order[:n_top]].double().mean())


def _metric(u, wrong, valid=None, **kw) -> dict:
    m = UncertaintyMetric(**kw)
    m.update(u, wrong, valid)
    return m.compute()


# ---------------------------------------------------------------------------- estimators


def test_step_change_hand_example():
    steps = torch.tensor([
        [[0, 1, 2, 3]],
        [[0, 2, 2, 1]],
        [[0, 1, 2, 1]],
    ])[:, None]  # S=3, B=1, H=1, W=4
    got = step_change_uncertainty(steps)
    assert got.dtype == torch.float32 and got.shape == (1, 1, 4)
    # pixel 0: never changes; 1: 1->2->1 changes twice; 2: never; 3: 3->1 once, then stays.
    assert got.flatten().tolist() == [0.0, 1.0, 0.0, 0.5]
    # a list of per-step maps gives the same result
    assert torch.equal(step_change_uncertainty(list(steps)), got)


def test_step_change_counts_changes_not_distinct_labels():
    # A -> B -> A changed twice although the first and last labels agree.
    steps = torch.tensor([5, 7, 5, 5, 5])[:, None, None, None]
    assert step_change_uncertainty(steps).item() == pytest.approx(2 / 4)


def test_step_change_single_step_is_zero():
    steps = torch.randint(0, 5, (1, 2, 3, 4))
    got = step_change_uncertainty(steps)
    assert got.shape == (2, 3, 4) and got.dtype == torch.float32
    assert not got.any()


def test_step_change_rejects_float_labels():
    with pytest.raises(TypeError):
        step_change_uncertainty(torch.zeros(3, 1, 2, 2))


def test_entropy_uniform_onehot_and_k2():
    k = 5
    uniform = torch.full((2, k, 3, 3), 1 / k)
    np.testing.assert_allclose(entropy_uncertainty(uniform).numpy(), 1.0, atol=1e-6)
    onehot = torch.zeros(2, k, 3, 3)
    onehot[:, 2] = 1
    got = entropy_uncertainty(onehot)
    assert got.shape == (2, 3, 3)
    assert torch.equal(got, torch.zeros(2, 3, 3))  # 0 log 0 is 0, no NaN
    p = torch.tensor([0.25, 0.75])[None, :, None, None]
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)  # ~0.8113
    assert entropy_uncertainty(p).item() == pytest.approx(expected, abs=1e-6)
    # class dimension elsewhere
    assert entropy_uncertainty(p.permute(0, 2, 3, 1), dim=-1).item() == pytest.approx(expected, abs=1e-6)


def test_entropy_single_class_is_zero():
    got = entropy_uncertainty(torch.ones(2, 1, 4, 4))
    assert got.shape == (2, 4, 4) and not got.any()


def test_entropy_in_unit_interval():
    probs = torch.softmax(3 * torch.randn(2, 7, 8, 8), 1)
    got = entropy_uncertainty(probs)
    assert got.min() >= 0 and got.max() <= 1


# ---------------------------------------------------------------------------- AUROC


def test_auroc_discrete_is_exact():
    g = torch.Generator().manual_seed(1)
    u = torch.randint(0, 5, (4, 20, 25), generator=g).float() / 4  # values k/4, many ties
    wrong = torch.rand(u.shape, generator=g) < 0.15 + 0.6 * u  # informative
    got = _metric(u, wrong)["AUROC"]
    ref = _rank_auroc(u, wrong)
    assert ref == pytest.approx(_pairwise_auroc(u, wrong), abs=1e-12)
    assert got == pytest.approx(100 * ref, abs=1e-9)
    assert 60 < got < 100
    if binary_auroc is not None:
        tm = float(binary_auroc(u.flatten(), wrong.flatten().long()))
        assert got == pytest.approx(100 * tm, abs=1e-4)


def test_auroc_step_change_estimator_is_exact():
    # S - 1 = 7 does not divide the bin count: k/7 must still land in distinct bins.
    g = torch.Generator().manual_seed(2)
    steps = torch.randint(0, 3, (8, 2, 16, 16), generator=g)
    u = step_change_uncertainty(steps)
    assert len(torch.unique(u)) > 4
    wrong = torch.rand(u.shape, generator=g) < u
    got = _metric(u, wrong)["AUROC"]
    assert got == pytest.approx(100 * _rank_auroc(u, wrong), abs=1e-9)


def test_auroc_continuous_within_bin_resolution():
    g = torch.Generator().manual_seed(3)
    wrong = torch.rand(3, 40, 50, generator=g) < 0.2
    u = torch.sigmoid(torch.randn(wrong.shape, generator=g) + 1.5 * wrong.float())
    got = _metric(u, wrong)["AUROC"]
    ref = _rank_auroc(u, wrong)
    assert got == pytest.approx(100 * ref, abs=1.0)  # 1e-2 as a fraction
    assert got == pytest.approx(100 * ref, abs=0.2)  # in practice far closer
    if binary_auroc is not None:
        tm = float(binary_auroc(u.flatten(), wrong.flatten().long()))
        assert tm == pytest.approx(ref, abs=1e-6)
        assert got == pytest.approx(100 * tm, abs=1.0)


def test_auroc_perfect_reversed_constant():
    wrong = torch.tensor([True, True, False, False, False])
    assert _metric(torch.tensor([0.9, 1.0, 0.1, 0.0, 0.3]), wrong)["AUROC"] == 100.0
    assert _metric(torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0]), wrong)["AUROC"] == 0.0
    assert _metric(torch.full((5,), 0.4), wrong)["AUROC"] == 50.0


def test_auroc_nan_when_one_class_empty():
    u = torch.rand(10)
    assert math.isnan(_metric(u, torch.zeros(10, dtype=torch.bool))["AUROC"])
    res = _metric(u, torch.ones(10, dtype=torch.bool))
    assert math.isnan(res["AUROC"]) and res["err_all"] == 100.0 and res["err_top10"] == 100.0


def test_empty_metric():
    res = UncertaintyMetric().compute()
    assert res["pixels"] == 0
    assert all(math.isnan(res[k]) for k in ("AUROC", "err_top10", "err_all"))


def test_value_one_goes_into_last_bin():
    m = UncertaintyMetric(bins=10)
    assert m.bin_index(torch.tensor([0.0, 0.0999, 0.1, 0.95, 1.0])).tolist() == [0, 0, 1, 9, 9]
    # float32 rounding of k/n just below an edge is absorbed
    assert m.bin_index(torch.tensor([0.7, 0.3, 0.6], dtype=torch.float32)).tolist() == [7, 3, 6]


# ---------------------------------------------------------------------------- err_top


def test_err_top_matches_sort_aligned_cut():
    # discrete values; the top 10% is exactly the pixels with u >= 0.8 (a whole-bin cut)
    g = torch.Generator().manual_seed(4)
    top = torch.randint(16, 21, (100,), generator=g).float() / 20
    rest = torch.randint(0, 16, (900,), generator=g).float() / 20
    u = torch.cat([top, rest])[torch.randperm(1000, generator=g)]
    wrong = torch.rand(1000, generator=g) < u
    res = _metric(u, wrong)
    assert res["err_top10"] == pytest.approx(_sort_err_top(u, wrong, 0.10), abs=1e-9)
    assert res["err_all"] == pytest.approx(100 * wrong.double().mean().item(), abs=1e-9)
    assert res["pixels"] == 1000


def test_err_top_matches_sort_distinct_bins():
    # continuous-looking values, each pixel in its own bin: no ties anywhere
    g = torch.Generator().manual_seed(5)
    u = (torch.randperm(1000, generator=g)[:500].double() + 0.5) / 1000
    wrong = torch.rand(500, generator=g) < u
    for frac in (0.10, 0.05, 0.3):
        res = _metric(u, wrong, top_fraction=frac)
        key = f"err_top{100 * frac:.6g}"
        assert res[key] == pytest.approx(_sort_err_top(u, wrong, frac), abs=1e-9)


def test_err_top_continuous_close_to_sort():
    g = torch.Generator().manual_seed(6)
    u = torch.rand(20000, generator=g)
    wrong = torch.rand(20000, generator=g) < u ** 2
    res = _metric(u, wrong)
    assert res["err_top10"] == pytest.approx(_sort_err_top(u, wrong, 0.10), abs=1.0)


def test_err_top_splits_ties_evenly():
    # 10 pixels, top 30% = 3 pixels: the 1.0 pixel (wrong) plus 2 of the 4 tied at 0.5, of
    # which 2 are wrong -> 2 * 2/4 = 1 expected error; (1 + 1) / 3.
    u = torch.tensor([1.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0])
    wrong = torch.tensor([1, 1, 0, 1, 0, 0, 0, 0, 0, 1], dtype=torch.bool)
    res = _metric(u, wrong, top_fraction=0.3)
    assert res["err_top30"] == pytest.approx(100 * 2 / 3)
    # fraction not a whole number of pixels: 0.25 * 10 = 2.5 -> 1 + 1.5 * 2/4 = 1.75 errors
    assert _metric(u, wrong, top_fraction=0.25)["err_top25"] == pytest.approx(100 * 1.75 / 2.5)
    # everything tied: the top share has the overall error rate
    res = _metric(torch.full((10,), 0.2), wrong)
    assert res["err_top10"] == pytest.approx(res["err_all"]) and res["err_all"] == 40.0


# ---------------------------------------------------------------------------- accumulation


def test_two_updates_equal_one_concatenated():
    g = torch.Generator().manual_seed(7)
    u = torch.rand(4, 10, 12, generator=g)
    wrong = torch.rand(u.shape, generator=g) < u
    valid = torch.rand(u.shape, generator=g) > 0.2
    one = UncertaintyMetric()
    one.update(u, wrong, valid)
    two = UncertaintyMetric()
    two.update(u[:1], wrong[:1], valid[:1])
    two.update(u[1:], wrong[1:], valid[1:])
    assert torch.equal(one.hist_wrong, two.hist_wrong)
    assert torch.equal(one.hist_right, two.hist_right)
    assert one.compute() == two.compute()
    a, b = UncertaintyMetric(), UncertaintyMetric()  # two processes' states, merged
    a.update(u[:1], wrong[:1], valid[:1])
    b.update(u[1:], wrong[1:], valid[1:])
    a.merge_state(b)
    assert torch.equal(a.hist_wrong, one.hist_wrong) and a.compute() == one.compute()


def test_invalid_pixels_are_ignored():
    g = torch.Generator().manual_seed(8)
    u = torch.rand(2, 8, 8, generator=g)
    wrong = torch.rand(u.shape, generator=g) < 0.3
    valid = torch.ones_like(wrong)
    valid[:, :3] = False
    u_junk = u.clone()
    u_junk[~valid] = float("nan")  # out-of-range values on invalid pixels are never looked at
    wrong_junk = wrong.clone()
    wrong_junk[~valid] = True
    got = _metric(u_junk, wrong_junk, valid)
    ref = _metric(u[valid], wrong[valid])
    assert got == ref and got["pixels"] == int(valid.sum())


def test_input_checks():
    m = UncertaintyMetric()
    with pytest.raises(ValueError):
        m.update(torch.tensor([1.5]), torch.tensor([True]))
    with pytest.raises(ValueError):
        m.update(torch.tensor([float("nan")]), torch.tensor([True]))
    with pytest.raises(TypeError):
        m.update(torch.tensor([0.5]), torch.tensor([1]))
    with pytest.raises(ValueError):
        m.update(torch.rand(2, 3), torch.zeros(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError):
        UncertaintyMetric(top_fraction=0.0)


# ---------------------------------------------------------------------------- distributed


def _dist_worker(rank, world, init_file, us, wrongs, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        m = UncertaintyMetric()
        m.update(us[rank], wrongs[rank])
        m.reduce()
        m.reduce()  # second call must not double-count
        torch.save({"w": m.hist_wrong, "r": m.hist_right}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_reduce_sums_over_processes():
    g = torch.Generator().manual_seed(9)
    us = [torch.rand(2, 6, 6, generator=g) for _ in range(2)]
    wrongs = [torch.rand(2, 6, 6, generator=g) < 0.4 for _ in range(2)]
    single = UncertaintyMetric()
    for u, w in zip(us, wrongs):
        single.update(u, w)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_dist_worker, args=(2, os.path.join(tmp, "init"), us, wrongs, tmp),
                 nprocs=2, join=True)
        for rank in range(2):
            got = torch.load(os.path.join(tmp, f"{rank}.pt"))
            assert torch.equal(got["w"], single.hist_wrong)
            assert torch.equal(got["r"], single.hist_right)


def test_reduce_without_distributed_is_noop():
    m = UncertaintyMetric()
    m.update(torch.rand(3, 3), torch.rand(3, 3) < 0.5)
    before = m.compute()
    m.reduce()
    assert m.compute() == before
