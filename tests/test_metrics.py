"""Segmentation loss and metrics: hand-computed cases, torchmetrics, a slow BIoU reference."""

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
import torch.nn.functional as F

from densediff.criteria.bev import BEVIoUMetric
from densediff.criteria.segmentation import (
    SegMetric,
    boundary_width,
    ce_loss,
    format_metrics,
    label_boundary,
)
from densediff.errors import DataError

IGN = 255
NAN = float("nan")


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64)


def _assert_close_nan(got: list[float], expected: list[float]) -> None:
    np.testing.assert_allclose(np.array(got, dtype=float), np.array(expected, dtype=float),
                               rtol=0, atol=1e-9, equal_nan=True)


# ----------------------------------------------------------------------------------- loss


def _manual_ce(logits, label, avg_non_ignore):
    up = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    valid = label != IGN
    nll = -up.log_softmax(1).gather(1, label.clamp(max=logits.shape[1] - 1)[:, None])[:, 0]
    total = (nll * valid).sum()
    return total / (valid.sum() if avg_non_ignore else label.numel())


@pytest.mark.parametrize("avg_non_ignore", [False, True])
def test_ce_loss_matches_formula_with_upsampling(avg_non_ignore):
    logits = torch.randn(2, 5, 4, 6)
    label = torch.randint(0, 5, (2, 8, 12))
    label[0, :3] = IGN
    got = ce_loss(logits, label, IGN, avg_non_ignore)
    torch.testing.assert_close(got, _manual_ce(logits, label, avg_non_ignore))


def test_ce_loss_averaging_modes():
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    label = torch.randint(0, 3, (2, 8, 8))
    label[:, :2] = IGN  # 32 of 128 pixels ignored
    mean_all = ce_loss(logits, label, IGN, avg_non_ignore=False)
    mean_valid = ce_loss(logits, label, IGN, avg_non_ignore=True)
    torch.testing.assert_close(mean_all, mean_valid * 96 / 128)
    torch.testing.assert_close(mean_valid, F.cross_entropy(logits, label, ignore_index=IGN))
    # all pixels ignored: zero (not NaN), and still differentiable
    loss = ce_loss(logits, torch.full_like(label, IGN), IGN, avg_non_ignore=True)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)


# ------------------------------------------------------------------------ confusion metrics

# 4x4, K=4. Valid pixels: 12.  GT 0: 4 px -> pred 0,0,0,2.  GT 1: 8 px -> pred 0,1,1,1,1,1,2,1.
# Ignore pixels (bottom right) carry predictions 2, 3, 0, 0 that must not count.
LABEL = _t([[0, 0, 1, 1],
            [0, 0, 1, 1],
            [1, 1, IGN, IGN],
            [1, 1, IGN, IGN]])
PRED = _t([[0, 0, 0, 1],
           [0, 2, 1, 1],
           [1, 1, 2, 3],
           [2, 1, 0, 0]])


def test_hand_computed_iou_acc_aacc_nan():
    m = SegMetric(4, IGN)
    m.update(PRED[None], LABEL[None])
    expected_cm = [[3, 0, 1, 0],
                   [1, 6, 1, 0],
                   [0, 0, 0, 0],
                   [0, 0, 0, 0]]
    assert m.confusion.tolist() == expected_cm
    r = m.compute()
    # IoU: 3/(4+4-3), 6/(8+6-6), 0/(0+2-0) (predicted, never GT), NaN (absent everywhere)
    _assert_close_nan([c["IoU"] for c in r["per_class"]], [60.0, 75.0, 0.0, NAN])
    # Acc: 3/4, 6/8, NaN (no GT although predicted, as mmseg), NaN
    _assert_close_nan([c["Acc"] for c in r["per_class"]], [75.0, 75.0, NAN, NAN])
    assert r["aAcc"] == pytest.approx(75.0)  # 9 / 12
    assert r["mIoU"] == pytest.approx(45.0)  # nanmean(60, 75, 0)
    assert r["mAcc"] == pytest.approx(75.0)
    # 4x4 image, d = 1: every pixel touches the border or another class -> BIoU == IoU here
    _assert_close_nan([c["BIoU"] for c in r["per_class"]], [60.0, 75.0, 0.0, NAN])


def test_accumulates_over_batches_and_list_input():
    once = SegMetric(4, IGN)
    once.update(PRED, LABEL)  # a single H x W map is accepted too
    batched, listed = SegMetric(4, IGN), SegMetric(4, IGN)
    # transposing both maps keeps every (gt, pred) pair and every band (square windows)
    batched.update(torch.stack([PRED, PRED.T]), torch.stack([LABEL, LABEL.T]))
    listed.update([PRED, PRED.T], [LABEL, LABEL.T])
    for m in (batched, listed):
        assert torch.equal(m.confusion, 2 * once.confusion)
        assert torch.equal(m.boundary_inter, 2 * once.boundary_inter)
        assert torch.equal(m.boundary_union, 2 * once.boundary_union)
    batched.reset()
    assert batched.confusion.sum() == 0 and batched.boundary_union.sum() == 0


def test_all_ignored_gives_nan_not_error():
    m = SegMetric(3, IGN)
    m.update(torch.zeros(1, 5, 5, dtype=torch.long), torch.full((1, 5, 5), IGN))
    r = m.compute()
    assert all(math.isnan(r[k]) for k in ("aAcc", "mIoU", "mAcc", "mBIoU"))


def test_bad_inputs():
    m = SegMetric(3, IGN)
    with pytest.raises(DataError, match="label value 7"):
        m.update(torch.zeros(1, 2, 2, dtype=torch.long), _t([[[0, 7], [IGN, 1]]]))
    with pytest.raises(ValueError, match="outside"):
        m.update(_t([[[0, 3], [0, 0]]]), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long))


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_torchmetrics(seed):
    tm = pytest.importorskip("torchmetrics.classification")
    g = torch.Generator().manual_seed(seed)
    k = 6
    jac = tm.MulticlassJaccardIndex(num_classes=k, ignore_index=IGN, average="none")
    cmat = tm.MulticlassConfusionMatrix(num_classes=k, ignore_index=IGN)
    rec = tm.MulticlassAccuracy(num_classes=k, ignore_index=IGN, average="none")
    micro = tm.MulticlassAccuracy(num_classes=k, ignore_index=IGN, average="micro")
    m = SegMetric(k, IGN)
    for _ in range(3):
        label = torch.randint(0, k, (2, 9, 11), generator=g)
        label[torch.rand(label.shape, generator=g) < 0.2] = IGN
        # predictions correct 60% of the time -> every class has TP, FP and FN
        noise = torch.randint(0, k, label.shape, generator=g)
        pred = torch.where(torch.rand(label.shape, generator=g) < 0.6, label.clamp(max=k - 1),
                           noise)
        m.update(pred, label)
        for metric in (jac, cmat, rec, micro):
            metric.update(pred, label)
    r = m.compute()
    assert torch.equal(m.confusion, cmat.compute().long())
    np.testing.assert_allclose([c["IoU"] for c in r["per_class"]], 100 * jac.compute().numpy(),
                               rtol=1e-5)
    np.testing.assert_allclose([c["Acc"] for c in r["per_class"]], 100 * rec.compute().numpy(),
                               rtol=1e-5)
    assert r["mIoU"] == pytest.approx(100 * jac.compute().mean().item(), rel=1e-5)
    assert r["aAcc"] == pytest.approx(100 * micro.compute().item(), rel=1e-5)


def test_format_table():
    m = SegMetric(4, IGN)
    m.update(PRED[None], LABEL[None])
    text = m.format_table(["sky", "road", "car", "pedestrian"])
    lines = text.splitlines()
    assert lines[0].split() == ["Class", "|", "IoU", "|", "Acc", "|", "BIoU"]
    assert lines[2].split() == ["sky", "|", "60.00", "|", "75.00", "|", "60.00"]
    assert lines[5].split() == ["pedestrian", "|", "nan", "|", "nan", "|", "nan"]
    assert lines[-1] == "aAcc 75.00  mIoU 45.00  mAcc 75.00  mBIoU 45.00"
    with pytest.raises(ValueError, match="class names"):
        m.format_table(["a"])
    # the same table from a JSON round trip of compute() (as written to eval_<split>.json)
    assert format_metrics(json.loads(json.dumps(m.compute())), None).splitlines()[2].startswith(
        "0     |  60.00")


# ------------------------------------------------------------------------------ boundary IoU


def _grid(text: str) -> torch.Tensor:
    return torch.tensor([[c == "#" for c in row] for row in text.split()])


def _square(h, w, top, left, size, cls=1):
    lab = torch.zeros(h, w, dtype=torch.long)
    lab[top:top + size, left:left + size] = cls
    return lab


def test_boundary_width():
    assert boundary_width((10, 10), 0.02) == 1  # 0.28 -> clamped to 1
    assert boundary_width((512, 512), 0.02) == 14  # 14.48
    assert boundary_width((360, 480), 0.02) == 12  # diag 600 -> 12
    assert boundary_width((30, 40), 0.05) == 2  # 2.5 -> 2 (half to even, like the reference)


def test_band_of_square_d1_including_image_border():
    lab = _square(10, 10, 3, 3, 4)  # class 1 on rows/cols 3..6, class 0 elsewhere
    expected = _grid("""
        ##########
        #........#
        #.######.#
        #.######.#
        #.##..##.#
        #.##..##.#
        #.######.#
        #.######.#
        #........#
        ##########""")
    band = label_boundary(lab[None], 1)[0]
    assert torch.equal(band, expected)
    ring = torch.ones(4, 4, dtype=torch.bool)
    ring[1:3, 1:3] = False
    assert torch.equal(band & (lab == 1), F.pad(ring, (3, 3, 3, 3)))


def test_band_d2_is_two_pixels_wide():
    lab = _square(12, 12, 2, 2, 8)
    band = label_boundary(lab[None], 2)[0] & (lab == 1)
    inner = torch.zeros(12, 12, dtype=torch.bool)
    inner[4:8, 4:8] = True  # the 8x8 square minus a 2-pixel rim
    assert torch.equal(band, (lab == 1) & ~inner)


def test_biou_hand_computed_shift():
    # 10x10, d = 1. GT square rows/cols 3..6, prediction shifted right by one column.
    # Class-1 rings: 12 px each, shared: top and bottom rows cols 4..6 = 6 -> BIoU 6/18.
    # Area IoU of class 1: 12 / 20.
    gt = _square(10, 10, 3, 3, 4)
    pred = _square(10, 10, 3, 4, 4)
    m = SegMetric(2, IGN)
    m.update(pred[None], gt[None])
    assert m.boundary_inter[1] == 6 and m.boundary_union[1] == 18
    r = m.compute()
    assert r["per_class"][1]["BIoU"] == pytest.approx(100 / 3)
    assert r["per_class"][1]["IoU"] == pytest.approx(60.0)


def test_identical_masks_give_100():
    g = torch.Generator().manual_seed(0)
    lab = torch.randint(0, 4, (2, 6, 8), generator=g).repeat_interleave(4, 1).repeat_interleave(
        4, 2)
    m = SegMetric(5, IGN)
    m.update(lab, lab)
    r = m.compute()
    assert r["mBIoU"] == 100.0 and r["mIoU"] == 100.0
    assert math.isnan(r["per_class"][4]["BIoU"])


def test_shift_hurts_boundary_iou_more_than_iou():
    gt = _square(64, 64, 12, 12, 40)  # d = round(0.02 * 90.5) = 2
    pred = _square(64, 64, 12, 13, 40)
    m = SegMetric(2, IGN)
    m.update(pred[None], gt[None])
    r = m.compute()
    iou, biou = r["per_class"][1]["IoU"], r["per_class"][1]["BIoU"]
    assert iou > 95 and biou < 75
    assert r["mIoU"] - r["mBIoU"] > 10


def test_ignore_pixels_excluded_from_boundary_counts():
    gt = _square(10, 10, 3, 3, 4)
    pred = gt.clone()
    pred[0, :] = 1  # wrong predictions on a row ...
    gt_ign = gt.clone()
    gt_ign[0, :] = IGN  # ... that is ignored
    m = SegMetric(2, IGN)
    m.update(pred[None], gt_ign[None])
    # row 0 is gone from every count; the ignore row is background for the GT band of class 0,
    # so row 1 becomes GT boundary, and it is also predicted boundary (next to pred row 0).
    assert m.compute()["mBIoU"] == 100.0
    assert m.confusion.sum() == 90


# slow reference: the official boundary_iou code (cv2.copyMakeBorder + cv2.erode 3x3, d times),
# written out with Python loops. cv2.erode leaves the area beyond the (padded) image neutral.


def _erode3x3_loop(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    out = np.zeros_like(mask)
    for y in range(h):
        for x in range(w):
            out[y, x] = min(mask[yy, xx]
                            for yy in range(max(y - 1, 0), min(y + 2, h))
                            for xx in range(max(x - 1, 0), min(x + 2, w)))
    return out


def _mask_to_boundary_ref(mask: np.ndarray, dilation_ratio: float) -> np.ndarray:
    h, w = mask.shape
    d = max(1, int(round(dilation_ratio * np.sqrt(h ** 2 + w ** 2))))
    m = np.pad(mask, 1, constant_values=0)
    for _ in range(d):
        m = _erode3x3_loop(m)
    return mask - m[1:h + 1, 1:w + 1]


def _reference_counts(preds, labels, k, ratio):
    inter, union = np.zeros(k, np.int64), np.zeros(k, np.int64)
    for pred, lab in zip(preds, labels):
        pred, lab = pred.numpy(), lab.numpy()
        valid = lab != IGN
        for c in range(k):
            gb = _mask_to_boundary_ref((lab == c).astype(np.uint8), ratio).astype(bool) & valid
            pb = _mask_to_boundary_ref((pred == c).astype(np.uint8), ratio).astype(bool) & valid
            inter[c] += (gb & pb).sum()
            union[c] += (gb | pb).sum()
    return inter, union


def _blocky(g, h, w, k, block):
    lo = torch.randint(0, k, (-(-h // block), -(-w // block)), generator=g)
    lab = lo.repeat_interleave(block, 0).repeat_interleave(block, 1)[:h, :w]
    flip = torch.rand(h, w, generator=g) < 0.05  # some isolated pixels too
    return torch.where(flip, torch.randint(0, k, (h, w), generator=g), lab)


@pytest.mark.parametrize("ratio,sizes", [(0.02, [(19, 23), (40, 30)]),  # d = 1, 1
                                         (0.06, [(21, 30), (17, 13)]),  # d = 2, 1
                                         (0.12, [(22, 31)])])  # d = 5
def test_fast_boundary_matches_loop_reference(ratio, sizes):
    g = torch.Generator().manual_seed(int(ratio * 100))
    k = 4
    labels, preds = [], []
    for h, w in sizes:
        lab = _blocky(g, h, w, k, 5)
        lab[_blocky(g, h, w, 3, 7) == 0] = IGN
        labels.append(lab)
        preds.append(_blocky(g, h, w, k, 4))
    m = SegMetric(k, IGN, boundary_dilation=ratio)
    m.update(preds, labels)
    inter, union = _reference_counts(preds, labels, k, ratio)
    assert union.sum() > 0 and inter.sum() > 0
    assert m.boundary_inter.tolist() == inter.tolist()
    assert m.boundary_union.tolist() == union.tolist()


# ------------------------------------------------------------------------------ distributed


def _dist_worker(rank, world, init_file, preds, labels, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        m = SegMetric(4, IGN)
        m.update(preds[rank], labels[rank])
        m.reduce()
        m.reduce()  # second call must not double-count
        out = {"confusion": m.confusion.clone(), "inter": m.boundary_inter.clone(),
               "union": m.boundary_union.clone()}
        with pytest.raises(RuntimeError, match="after reduce"):
            m.update(preds[rank], labels[rank])
        out["after_reduce"] = m.compute()  # on the sums, no second sync
        # torchmetrics' own life cycle: compute() syncs by itself, then restores the local
        # states, so accumulation can go on and a later compute() syncs again
        lone = SegMetric(4, IGN)
        lone.update(preds[rank][:1], labels[rank][:1])
        out["half"] = lone.compute()
        out["local_after_compute"] = lone.confusion.clone()
        lone.update(preds[rank][1:], labels[rank][1:])
        out["compute"] = lone.compute()
        bev = BEVIoUMetric(["a", "b"])
        bev.update(*_bev_data(rank))
        out["bev"] = bev.compute()
        own = SegMetric(4, IGN, sync_on_compute=False)  # this process's data only
        own.update(preds[rank], labels[rank])
        out["own"] = own.compute()
        torch.save(out, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _bev_data(part: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(20 + part)
    return torch.rand(2, 2, 5, 6, generator=g), (torch.rand(2, 2, 5, 6, generator=g) < 0.3).long()


def test_distributed_reduce_sums_over_processes():
    g = torch.Generator().manual_seed(3)
    preds = [torch.randint(0, 4, (2, 12, 12), generator=g) for _ in range(2)]
    labels = [torch.randint(0, 4, (2, 12, 12), generator=g) for _ in range(2)]
    labels[1][:, :3] = IGN
    single = SegMetric(4, IGN)
    for p, lab in zip(preds, labels):
        single.update(p, lab)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_dist_worker, args=(2, os.path.join(tmp, "init"), preds, labels, tmp),
                 nprocs=2, join=True)
        half = SegMetric(4, IGN)
        for p, lab in zip(preds, labels):
            half.update(p[:1], lab[:1])
        bev = BEVIoUMetric(["a", "b"])
        for part in range(2):
            bev.update(*_bev_data(part))
        for rank in range(2):
            got = torch.load(os.path.join(tmp, f"{rank}.pt"))
            assert torch.equal(got["confusion"], single.confusion)
            assert torch.equal(got["inter"], single.boundary_inter)
            assert torch.equal(got["union"], single.boundary_union)
            _same(got["after_reduce"], single.compute())
            _same(got["compute"], single.compute())
            _same(got["half"], half.compute())
            assert torch.equal(got["local_after_compute"],
                               torch.bincount(_valid_pairs(preds[rank][:1], labels[rank][:1]),
                                              minlength=16).view(4, 4))
            _same(got["bev"], bev.compute())
            own = SegMetric(4, IGN)
            own.update(preds[rank], labels[rank])
            _same(got["own"], own.compute())


def _valid_pairs(pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    valid = label != IGN
    return label[valid] * 4 + pred[valid]


def _same(a, b) -> None:
    """Equal results, NaN == NaN (the metrics' dicts, lists and floats)."""
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_merge_state_equals_one_metric_over_all_data():
    g = torch.Generator().manual_seed(5)
    preds = [torch.randint(0, 4, (2, 10, 9), generator=g) for _ in range(2)]
    labels = [torch.randint(0, 4, (2, 10, 9), generator=g) for _ in range(2)]
    labels[0][:, :2] = IGN
    whole, a, b = SegMetric(4, IGN), SegMetric(4, IGN), SegMetric(4, IGN)
    for p, lab in zip(preds, labels):
        whole.update(p, lab)
    a.update(preds[0], labels[0])
    b.update(preds[1], labels[1])
    a.merge_state(b)
    _same(a.compute(), whole.compute())

    bev_whole, bev_a, bev_b = (BEVIoUMetric(["a", "b"]) for _ in range(3))
    for part, m in enumerate((bev_a, bev_b)):
        m.update(*_bev_data(part))
        bev_whole.update(*_bev_data(part))
    bev_a.merge_state(bev_b)
    _same(bev_a.compute(), bev_whole.compute())


def test_metric_states_follow_to_and_reset():
    m = SegMetric(3, IGN, device="meta")
    assert m.device.type == "meta" and m.confusion.device.type == "meta"
    m = SegMetric(3, IGN)
    m.update(PRED[None] % 3, LABEL[None])
    first = m.compute()
    moved = m.clone().to("meta")  # the states move; the defaults too (reset keeps the device)
    assert {t.device.type for t in (moved.confusion, moved.boundary_inter,
                                    moved.boundary_union)} == {"meta"}
    moved.reset()
    assert moved.confusion.device.type == "meta"
    m.reset()
    assert int(m.confusion.sum()) == 0 and m.confusion.device.type == "cpu"
    m.update(PRED[None] % 3, LABEL[None])
    _same(m.compute(), first)
    assert BEVIoUMetric(["a"], device="meta").tp.device.type == "meta"


def test_compute_returns_a_fresh_dict_and_no_warning_when_empty(recwarn):
    m = SegMetric(2, IGN)
    res = m.compute()  # before any update: NaN results, no torchmetrics warning
    assert math.isnan(res["mIoU"]) and not [w for w in recwarn if "compute" in str(w.message)]
    res["extra"] = 1  # a caller may add keys (evaluate adds "uncertainty")
    assert "extra" not in m.compute()


def test_tasks_do_not_import_the_distributed_helpers():
    import ast
    from pathlib import Path

    import densediff.criteria

    for path in Path(densediff.criteria.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [f"{node.module}." + a.name for a in node.names]
                     if isinstance(node, ast.ImportFrom) and node.module else [])
            assert not any(n.startswith("densediff.utils.distributed") for n in names), path


def test_reduce_without_distributed_is_noop():
    m = SegMetric(4, IGN)
    m.update(PRED[None], LABEL[None])
    before = m.confusion.clone()
    m.reduce()
    assert torch.equal(m.confusion, before)
    m.update(PRED[None], LABEL[None])  # allowed: nothing was reduced


def test_class_ids_is_argmax_with_first_max_on_ties():
    from densediff.criteria.segmentation import class_ids

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 17, 23, generator=g)
    x[:, 3] = x[:, 1]  # exact ties between classes 1 and 3 everywhere: the first (1) wins
    x[0, :, 0, 0] = 0.0  # a constant column: the first class
    assert torch.equal(class_ids(x), x.argmax(1))
    assert int(class_ids(x)[0, 0, 0]) == 0
    assert not (class_ids(x) == 3).any()


def test_segmetric_without_boundary_same_miou_nan_biou():
    g = torch.Generator().manual_seed(1)
    label = torch.randint(0, 4, (2, 40, 50), generator=g)
    label[:, :5] = IGN
    pred = torch.randint(0, 4, (2, 40, 50), generator=g)
    full, fast = SegMetric(4, IGN), SegMetric(4, IGN, boundary=False)
    full.update(pred, label)
    fast.update(pred, label)
    a, b = full.compute(), fast.compute()
    assert a["mIoU"] == b["mIoU"] and a["aAcc"] == b["aAcc"]
    assert a["mBIoU"] == a["mBIoU"] and b["mBIoU"] != b["mBIoU"]  # a number vs NaN
