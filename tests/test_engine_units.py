"""Engine building blocks: LR schedule, parameter groups, EMA, train step, sampler, checkpoints."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from densediff.config import TrainConfig
from densediff.engine.ema import EMA
from densediff.engine.logger import CSVLog
from densediff.engine.optim import (
    LR_SCHEDULES,
    build_optimizer,
    cosine_lr,
    cyclic_lr,
    no_decay_names,
    param_groups,
    poly_lr,
    scheduled_lr,
    set_lr,
    warmup_factor,
)
from densediff.engine.sampler import InfiniteSampler
from densediff.engine.trainer import train_step
from densediff.errors import CheckpointError
from densediff.utils import checkpoint as ck

# --------------------------------------------------------------------------------------------
# learning rate


def test_poly_lr_matches_mmcv_formula():
    cfg = TrainConfig(iters=100, warmup_iters=10, warmup_ratio=0.1, poly_power=1.0, min_lr=0.0)
    assert scheduled_lr(1.0, 0, cfg) == pytest.approx(0.1)  # warmup_ratio * lr
    assert scheduled_lr(1.0, 5, cfg) == pytest.approx(0.95 * (1 - 0.5 * 0.9))
    assert scheduled_lr(1.0, 10, cfg) == pytest.approx(0.9)  # warmup over: plain poly
    assert scheduled_lr(1.0, 99, cfg) == pytest.approx(0.01)
    assert poly_lr(1.0, 5, cfg) == pytest.approx(0.95)  # the policy alone: no warmup
    cfg = TrainConfig(iters=50, warmup_iters=0, poly_power=0.9, min_lr=1e-4)
    for it in (0, 7, 49):
        want = (2e-3 - 1e-4) * (1 - it / 50) ** 0.9 + 1e-4
        assert scheduled_lr(2e-3, it, cfg) == pytest.approx(want, rel=1e-12)


def test_scheduled_lr_dispatches_on_lr_schedule_with_warmup():
    """Each schedule at base lr 2, 100 iterations, mmcv's linear warmup over 10 iterations
    from ratio 0.1: the warmup factor is 1 - (1 - it/10) * 0.9 = 0.1, 0.37, 1, 1 at it = 0, 3,
    10, 57. Expected values written out from mmcv's formulas (not the implementation's):
    poly 2 (1 - it/100); cosine 1 + cos(pi it/100); cyclic (one-cycle, up 40 %) 2 x
    [10 - 4.5 (1 + cos(pi it/40))] below it = 40, 2 x [1e-4 + (10 - 1e-4)/2 (1 + cos(pi
    (it - 40)/60))] after."""
    want = {
        "poly": {0: 2 * 0.1, 3: 1.94 * 0.37, 10: 1.8, 57: 0.86},
        "cosine": {0: 2 * 0.1, 3: 1.9955619646 * 0.37, 10: 1.9510565163, 57: 0.7818567586},
        "cyclic": {0: 2 * 0.1, 3: 2.2486707164 * 0.37, 10: 4.6360389693, 57: 16.2932409785},
    }
    assert set(want) == set(LR_SCHEDULES)
    for name, values in want.items():
        cfg = TrainConfig(iters=100, warmup_iters=10, warmup_ratio=0.1, lr_schedule=name)
        for it, lr in values.items():
            assert scheduled_lr(2.0, it, cfg) == pytest.approx(lr, rel=1e-7), (name, it)
    cfg = TrainConfig(iters=100, warmup_iters=10, warmup_ratio=0.1)
    assert [warmup_factor(it, cfg) for it in (0, 3, 10, 57)] == pytest.approx([0.1, 0.37, 1, 1])
    assert (cosine_lr(1.0, 50, TrainConfig(iters=100, min_lr=0.0)), warmup_factor(10, cfg)) \
        == (pytest.approx(0.5), 1.0)
    assert cyclic_lr(1.0, 40, TrainConfig(iters=100)) == pytest.approx(10.0)
    assert poly_lr(2.0, 57, cfg) == pytest.approx(0.86)  # the policy alone: no warmup factor
    with pytest.raises(ValueError, match="unknown lr_schedule 'step'"):
        scheduled_lr(1.0, 0, cfg.model_copy(update={"lr_schedule": "step"}))


def test_set_lr_applies_head_multiplier_with_absolute_min_lr():
    """lr 1e-3, head x10, poly power 1, min_lr 1e-5 (absolute, mmcv), it 5 of 20:
    (lr - min_lr) * 0.75 + min_lr per group."""
    cfg = TrainConfig(iters=20, lr=1e-3, head_lr_mult=10.0, warmup_iters=0, min_lr=1e-5)
    opt = build_optimizer(_Net(), cfg)
    base = set_lr(opt, 5, cfg)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert base == pytest.approx((1e-3 - 1e-5) * 0.75 + 1e-5)
    assert lrs["encoder_decay"] == pytest.approx((1e-3 - 1e-5) * 0.75 + 1e-5)
    assert lrs["head_decay"] == pytest.approx((1e-2 - 1e-5) * 0.75 + 1e-5)  # mmcv: min_lr absolute


# --------------------------------------------------------------------------------------------
# parameter groups


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.ln = nn.LayerNorm(4)
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 2, 2))
        self.relative_position_bias_table = nn.Parameter(torch.zeros(9, 2))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = _Block()
        self.neck = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.GroupNorm(2, 4))
        self.head = nn.Conv2d(4, 2, 1)


def test_param_groups_no_decay_and_head_lr():
    net = _Net()
    net.encoder.ln.requires_grad_(False)  # frozen params are left out
    cfg = TrainConfig(weight_decay=0.05, head_lr_mult=10.0)
    groups = {g["name"]: g for g in param_groups(net, cfg)}
    names = {id(p): n for n, p in net.named_parameters()}
    got = {g: sorted(names[id(p)] for p in groups[g]["params"]) for g in groups}
    assert got == {
        "encoder_decay": ["encoder.conv.weight"],
        "encoder_no_decay": ["encoder.bn.bias", "encoder.bn.weight", "encoder.conv.bias",
                             "encoder.pos_embed", "encoder.relative_position_bias_table"],
        "head_decay": ["head.weight", "neck.0.weight"],
        "head_no_decay": ["head.bias", "neck.1.bias", "neck.1.weight"],
    }
    assert [groups[g]["weight_decay"] for g in sorted(groups)] == [0.05, 0.0, 0.05, 0.0]
    assert [groups[g]["lr_mult"] for g in sorted(groups)] == [1.0, 1.0, 10.0, 10.0]
    # norm weights are excluded because of the layer type, even if they were 2-D
    assert {"encoder.ln.weight", "neck.1.weight"} <= no_decay_names(net)


# --------------------------------------------------------------------------------------------
# EMA


def test_ema_init_share():
    from densediff.engine.trainer import ema_init_share

    # the official DDPS EMA (0.99 every 25 iterations) on a 500-iteration run: 20 updates
    assert ema_init_share(500, 0.99, 25) == pytest.approx(0.99 ** 20)
    assert ema_init_share(400_000, 0.99, 25) < 1e-60
    assert ema_init_share(10, 0.5, 20) == 1.0  # no update at all


def test_ema_update_rule():
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = EMA(net, decay=0.9)
    w0 = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net.train()(torch.randn(4, 3))  # changes BN running stats and num_batches_tracked
    ema.update(net)
    torch.testing.assert_close(ema.module[0].weight, 0.9 * w0 + 0.1 * net[0].weight,
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(ema.module[1].running_mean, 0.1 * net[1].running_mean,
                               rtol=0, atol=1e-7)
    assert int(ema.module[1].num_batches_tracked) == 1  # integers are copied
    w1 = ema.module[0].weight.clone()
    ema.update(net)
    torch.testing.assert_close(ema.module[0].weight, 0.9 * w1 + 0.1 * net[0].weight,
                               rtol=0, atol=1e-6)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())


# --------------------------------------------------------------------------------------------
# train step


class _PixelNet(nn.Module):
    """Deterministic, batch-independent: 1x1 convs (no BN, no dropout), mean CE per pixel."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, img, label):
        loss = F.cross_entropy(self.head(torch.tanh(self.encoder(img))), label)
        return {"loss": loss, "loss_ce": loss.detach()}


def _batches(images, labels, bs):
    return iter([{"image": images[i:i + bs], "label": labels[i:i + bs]}
                 for i in range(0, len(images), bs)])


def test_grad_accumulation_equals_big_batch():
    images, labels = torch.randn(4, 3, 5, 5), torch.randint(0, 3, (4, 5, 5))
    results = []
    for accum, bs in ((2, 2), (1, 4)):
        torch.manual_seed(0)
        net = _PixelNet()
        w0 = net.head.weight.detach().clone()
        opt = torch.optim.SGD(net.parameters(), lr=0.5)  # SGD: sensitive to the grad scale
        losses, norm = train_step(net, opt, _batches(images, labels, bs), accum_steps=accum)
        results.append((net.state_dict(), float(losses["loss"]), norm))
    (sa, la, na), (sb, lb, nb) = results
    assert la == pytest.approx(lb, rel=1e-6) and na == pytest.approx(nb, rel=1e-5)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=1e-6)
    assert not torch.equal(sa["head.weight"], w0)  # a step happened


def test_grad_clip_and_nonfinite_skip():
    images, labels = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    net = _PixelNet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    _, norm = train_step(net, opt, _batches(images, labels, 2), grad_clip=1e-3)
    moved = math.sqrt(sum(((net.state_dict()[k] - before[k]) ** 2).sum() for k in before))
    assert norm > 1e-3 and moved == pytest.approx(1e-3, rel=1e-3)  # lr 1: step = clipped grad

    before = {k: v.clone() for k, v in net.state_dict().items()}
    _, norm = train_step(net, opt, _batches(images * float("nan"), labels, 2))
    assert math.isnan(norm)
    assert all(torch.equal(net.state_dict()[k], before[k]) for k in before)  # step skipped
    assert all(p.grad is None for p in net.parameters())


# --------------------------------------------------------------------------------------------
# sampler


def test_sampler_shards_epochs_and_resumes():
    n, world = 10, 3
    per_rank = [InfiniteSampler(n, seed=1, rank=r, world_size=world) for r in range(world)]
    assert all(s.per_rank == 4 for s in per_rank)
    epoch0 = [item for s in per_rank for item in s.epoch_items(0)]
    assert {i for i, _ in epoch0} == set(range(n))  # every image once (+2 padding repeats)
    seeds0 = dict(epoch0)
    seeds1 = dict(item for s in per_rank for item in s.epoch_items(1))
    assert all(seeds0[i] != seeds1[i] for i in range(n))  # new augmentation every epoch
    assert [i for i, _ in per_rank[0].epoch_items(0)] != [i for i, _ in per_rank[0].epoch_items(1)]

    stream = list(itertools.islice(iter(per_rank[1]), 13))
    for start in (0, 3, 4, 9):
        resumed = InfiniteSampler(n, seed=1, rank=1, world_size=world, start=start)
        assert list(itertools.islice(iter(resumed), 13 - start)) == stream[start:]
    other = list(itertools.islice(iter(InfiniteSampler(n, seed=2, rank=1, world_size=world)), 13))
    assert other != stream


# --------------------------------------------------------------------------------------------
# checkpoints


class _Cfg:
    def to_dict(self):
        return {"seed": 3, "model": {"x": 1}}


def _state():
    torch.manual_seed(0)
    return {"a.weight": torch.randn(3, 2), "a.bias": torch.zeros(3),
            "n": torch.tensor(4, dtype=torch.int64)}


def test_checkpoint_roundtrip_metadata(tmp_path):
    shared = torch.randn(4)
    state = {**_state(), "tied1": shared, "tied2": shared, "view": torch.arange(10.0)[2:5]}
    path = tmp_path / "m.safetensors"
    ck.save_checkpoint(path, state, _Cfg(), {"iteration": 7, "kind": "ema"})
    loaded, cfg = ck.load_weights(path)
    assert cfg == {"seed": 3, "model": {"x": 1}}
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    meta = ck.load_metadata(path)
    assert meta["iteration"] == 7 and meta["kind"] == "ema" and meta["format"] == "densediff"


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "last.safetensors"
    ck.save_checkpoint(path, _state(), _Cfg(), {"iteration": 1})

    def crash(tensors, filename, metadata=None):  # dies half-way through writing
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(path, {"a.weight": torch.ones(3, 2)}, _Cfg(), {"iteration": 2})
    state, _ = ck.load_weights(path)
    assert torch.equal(state["a.weight"], _state()["a.weight"])
    assert ck.load_metadata(path)["iteration"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors"]  # no temp left


def test_nan_guard_refuses_to_write(tmp_path):
    path = tmp_path / "last.safetensors"
    ck.save_checkpoint(path, _state(), _Cfg(), {"iteration": 1})
    bad = {**_state(), "a.bias": torch.tensor([0.0, float("inf"), 1.0])}
    with pytest.raises(CheckpointError, match=r"last\.safetensors.*'a\.bias'.*NaN/inf"):
        ck.save_checkpoint(path, bad, _Cfg(), {"iteration": 2})
    assert ck.load_metadata(path)["iteration"] == 1


def test_bad_checkpoint_files_name_the_file(tmp_path):
    good = tmp_path / "good.safetensors"
    ck.save_checkpoint(good, _state(), _Cfg())
    data = good.read_bytes()
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(data[: len(data) - 10])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint at all")
    foreign = tmp_path / "foreign.safetensors"
    import safetensors.torch
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(foreign))
    for path, msg in ((truncated, "corrupt, truncated"), (garbage, "corrupt, truncated"),
                      (foreign, "not a densediff checkpoint"),
                      (tmp_path / "missing.safetensors", "not found")):
        with pytest.raises(CheckpointError, match=msg) as e:
            ck.load_weights(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_load_into_names_first_mismatch():
    net = nn.Linear(2, 3)
    good = {"weight": torch.ones(3, 2), "bias": torch.zeros(3)}
    ck.load_into(net, good, source="x.safetensors")
    assert torch.equal(net.weight, torch.ones(3, 2))
    cases = [({"weight": torch.ones(4, 2), "bias": torch.zeros(3)}, r"'weight' has shape \(4, 2\)"),
             ({"weight": torch.ones(3, 2)}, "key 'bias' is missing"),
             ({**good, "extra": torch.zeros(1)}, "unexpected key 'extra'")]
    for state, msg in cases:
        with pytest.raises(CheckpointError, match=f"x.safetensors: does not fit the model: {msg}"):
            ck.load_into(net, state, source="x.safetensors")


class _Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_train_state_roundtrip_and_refusals(tmp_path):
    path = tmp_path / "last.state.pt"
    state = {"iteration": 3, "best": None, "rng": [{"torch": torch.get_rng_state()}],
             "py": (3, (1, 2), None)}
    ck.save_train_state(path, state)
    got = ck.load_train_state(path)
    assert got["iteration"] == 3 and got["best"] is None and got["py"] == (3, (1, 2), None)
    assert torch.equal(got["rng"][0]["torch"], state["rng"][0]["torch"])
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="last.state.pt: corrupt"):
        ck.load_train_state(path)
    evil = tmp_path / "evil.pt"
    torch.save({"x": _Evil()}, evil)
    with pytest.raises(CheckpointError, match="evil.pt"):
        ck.load_train_state(evil)


# --------------------------------------------------------------------------------------------
# metrics.csv


def test_csv_log_grows_header_and_truncates(tmp_path):
    log = CSVLog(tmp_path / "metrics.csv")
    log.log({"iter": 1, "loss": 2.0})
    log.log({"iter": 2, "loss": 1.5})
    log.log({"iter": 2, "mIoU": 40.0})
    log.log({"iter": 3, "loss": 1.0})
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines == ["iter,loss,mIoU", "1,2.0,", "2,1.5,", "2,,40.0", "3,1.0,"]
    CSVLog(tmp_path / "metrics.csv").truncate(2)
    assert (tmp_path / "metrics.csv").read_text().splitlines() == lines[:4]
