"""``train.precision``: fp16 with loss scaling survives overflow steps (on the CPU, where
torch has float16 autocast and ``GradScaler("cpu")``), and which precision ``auto`` picks on
which device (the device's capabilities mocked)."""

import math

import pytest
import torch

from densediff.engine import trainer as T
from densediff.errors import ConfigError
from densediff.tasks import build_model, class_info, load_config
from densediff.testing import tiny
from densediff.testing.tiny import DDP_HEAD
from densediff.utils import precision as P


def _tiny_ddp():
    cfg = load_config("configs/generated/ddp.yaml", [*tiny.TINY["generated/baseline.yaml"],
                                                     *DDP_HEAD])
    return build_model(cfg, len(class_info(cfg)[0])).train(), cfg


def test_fp16_overflow_steps_are_skipped_and_the_scale_backs_off():
    from densediff.engine.optim import build_optimizer

    model, cfg = _tiny_ddp()
    opt = build_optimizer(model, cfg.train)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 60)  # fp16 gradients overflow
    batch = {"image": torch.randn(2, 3, 32, 32), "label": torch.randint(0, 4, (2, 32, 32))}
    seen = []
    hook = model.fuse.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    before = [p.detach().clone() for p in model.parameters()]
    losses, norm = T.train_step(model, opt, iter([batch]), precision="fp16", scaler=scaler)
    hook.remove()
    assert seen == [torch.float16]  # the network really ran in float16
    assert math.isfinite(float(losses["loss"])) and not math.isfinite(norm)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # step skipped
    assert scaler.get_scale() == 2.0 ** 59  # backed off
    for _ in range(60):  # it keeps backing off until the gradients fit, then steps
        losses, norm = T.train_step(model, opt, iter([batch]), precision="fp16", scaler=scaler)
        if math.isfinite(norm):
            break
    assert math.isfinite(norm) and scaler.get_scale() < 2.0 ** 59
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())  # no NaN


def test_fp16_training_run_survives_overflow(tmp_path, monkeypatch):
    """A run through the trainer with train.precision=fp16 whose first steps overflow: no
    divergence error, finite weights, the scaler state saved for resume."""
    made = []

    def scaler(precision, device):
        made.append(precision)
        return torch.amp.GradScaler("cpu", init_scale=2.0 ** 40) if precision == "fp16" else None

    monkeypatch.setattr(T, "grad_scaler", scaler)
    cfg = load_config("configs/generated/ddp.yaml", [
        *tiny.TINY["generated/baseline.yaml"], *DDP_HEAD, "train.precision=fp16",
        "train.iters=3", "train.eval_interval=3", "train.ckpt_interval=3",
        f"work_dir={tmp_path / 'run'}"])
    metrics = T.train(cfg)
    assert made == ["fp16"] and metrics["iter"] == 3
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.state.pt", weights_only=False)
    assert state["scaler"]["scale"] < 2.0 ** 40  # the overflow steps backed it off


@pytest.fixture
def cuda_card(monkeypatch):
    """A CUDA card whose bf16 support the test sets."""
    card = {"bf16": True}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: card["bf16"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    return card


def test_auto_picks_bf16_on_cards_with_it_and_fp16_elsewhere(cuda_card):
    assert P.resolve_train_precision("auto", "cuda") == "bf16"  # A100, H100, RTX 30xx/40xx
    cuda_card["bf16"] = False
    assert P.resolve_train_precision("auto", "cuda") == "fp16"  # V100, T4, RTX 20xx
    assert P.resolve_train_precision("fp16", "cuda") == "fp16"
    assert P.resolve_train_precision("fp32", "cuda") == "fp32"
    with pytest.raises(ValueError, match="train.precision: bf16 needs .*Tesla T4.* use fp16"):
        P.resolve_train_precision("bf16", "cuda")


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_the_cpu_follows_the_native_bf16_rule(monkeypatch, native):
    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: native)
    assert P.resolve_train_precision("auto", "cpu") == ("bf16" if native else "fp32")
    assert P.resolve_train_precision("fp16", "cpu") == "fp16"
    with pytest.raises(ValueError, match="expected fp32, bf16, fp16 or auto, got 'fp8'"):
        P.resolve_train_precision("fp8", "cpu")


def test_train_amp_maps_onto_auto(cuda_card):
    """Old configs (train.precision unset): train.amp is auto on CUDA, fp32 on the CPU."""
    t = load_config("configs/generated/ddp.yaml", []).train
    assert t.precision is None and t.amp
    cuda_card["bf16"] = False
    assert T.train_precision(t, torch.device("cuda")) == "fp16"
    assert T.train_precision(t, torch.device("cpu")) == "fp32"
    t.amp = False
    assert T.train_precision(t, torch.device("cuda")) == "fp32"
    t.precision = "bf16"
    with pytest.raises(ConfigError, match="bf16 needs"):
        T.train_precision(t, torch.device("cuda"))
    assert T.grad_scaler("bf16", torch.device("cpu")) is None
    assert isinstance(T.grad_scaler("fp16", torch.device("cpu")), torch.amp.GradScaler)
