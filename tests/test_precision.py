"""bf16 precision (issue #16): autocast where it is safe, float32 where it must be; the
``--precision`` / ``train.precision`` options and their errors."""

import json

import pytest
import torch

from densediff.cli.main import main
from densediff.config import load_config
from densediff.data import class_info
from densediff.errors import UserError
from densediff.models import build_model
from densediff.utils.precision import autocast, resolve_precision
from test_cli import TINY, one_line_error
from test_cli_ddp import DDP_TINY


def _tiny_ddp():
    cfg = load_config("configs/generated/ddp.yaml", [*TINY, *DDP_TINY])
    return build_model(cfg, len(class_info(cfg)[0])).eval(), cfg


def test_resolve_precision():
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", "cpu") in ("fp32", "bf16")
    with pytest.raises(ValueError, match="--precision: expected fp32, bf16 or auto, got 'fp16'"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="precision: expected fp32 or bf16"):
        autocast("auto", "cpu")


def test_sampling_stays_float32_under_bf16_autocast():
    """Noise, DDIM updates and the trajectory are float32 under autocast; the network's
    matmuls are bf16 (so the context is really on); the seeded noise is the fp32 run's."""
    torch.manual_seed(0)
    model, _ = _tiny_ddp()
    img = torch.randn(1, 3, 32, 32)
    seen = []
    hook = model.fuse.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.no_grad():
        ref = model.sample_steps(model.extract(img), 3, seeds=[7])
        with autocast("bf16", "cpu"):
            low = model.sample_steps(model.extract(img), 3, seeds=[7])
    hook.remove()
    assert seen[0] == torch.float32 and seen[-1] == torch.bfloat16
    assert all(lg.dtype == torch.float32 for lg in low.logits)
    agree = (low.logits[-1].argmax(2) == ref.logits[-1].argmax(2)).float().mean()
    assert agree > 0.9
    assert (low.logits[0] - ref.logits[0]).abs().max() < 0.1 * ref.logits[0].abs().max()


def test_train_step_runs_under_bf16_on_cpu():
    from densediff.engine.optim import build_optimizer
    from densediff.engine.trainer import train_precision, train_step

    model, cfg = _tiny_ddp()
    model.train()
    seen = []
    hook = model.fuse.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    opt = build_optimizer(model, cfg.train)
    batch = {"image": torch.randn(2, 3, 32, 32), "label": torch.randint(0, 4, (2, 32, 32))}
    before = model.fuse.weight.detach().clone()
    losses, norm = train_step(model, opt, iter([batch]), precision="bf16")
    hook.remove()
    assert torch.bfloat16 in seen
    assert losses["loss"].dtype == torch.float32 and torch.isfinite(losses["loss"])
    assert norm > 0 and not torch.equal(before, model.fuse.weight)
    assert model.fuse.weight.dtype == torch.float32  # the master weights stay fp32
    # train.precision wins; None: bf16 only on GPU with train.amp
    t = cfg.train.model_copy(update={"precision": None, "amp": True})
    assert train_precision(t, torch.device("cpu")) == "fp32"
    assert train_precision(t, torch.device("cuda")) == "bf16"
    assert train_precision(t.model_copy(update={"precision": "bf16"}), torch.device("cpu")) == "bf16"


def test_train_precision_key_is_checked():
    with pytest.raises(Exception, match="train.precision"):
        load_config("configs/generated/ddp.yaml", [*TINY, "train.precision=fp16"])


@pytest.fixture(scope="module")
def ddp_ckpt(tmp_path_factory):
    work = tmp_path_factory.mktemp("prec") / "run"
    assert main(["train", "configs/generated/ddp.yaml", *TINY, *DDP_TINY, f"work_dir={work}",
                 "train.precision=bf16"]) == 0
    return work / "checkpoints" / "best.safetensors"


def test_eval_and_predict_in_bf16(ddp_ckpt, tmp_path, capsys):
    outs = {}
    for p in ("fp32", "bf16"):
        out = tmp_path / f"{p}.json"
        assert main(["eval", str(ddp_ckpt), "--steps", "1,3", "--no-controls", "--quiet",
                     "--precision", p, "--out", str(out)]) == 0
        assert f", {p}" in capsys.readouterr().out
        outs[p] = json.loads(out.read_text())["steps"]
    for n in ("1", "3"):  # the same model scored both ways: close, not necessarily equal
        assert abs(outs["fp32"][n]["mIoU"] - outs["bf16"][n]["mIoU"]) < 10
    import densediff
    img = torch.rand(40, 48, 3).mul(255).byte().numpy()
    a = densediff.load(ddp_ckpt).predict(img, steps=3, seed=1)
    b = densediff.load(ddp_ckpt, precision="bf16").predict(img, steps=3, seed=1)
    assert a.mask.shape == b.mask.shape == (40, 48)
    assert (a.mask == b.mask).mean() > 0.9
    with pytest.raises(UserError, match="precision: expected fp32, bf16 or auto"):
        densediff.load(ddp_ckpt, precision="half")
    one_line_error(capsys, main(["eval", str(ddp_ckpt), "--precision", "fp16"]), "--precision")


def test_predict_compile_wires_torch_compile(ddp_ckpt, tmp_path, monkeypatch, capsys):
    """``predict --compile`` compiles the map decoder (spied: the real compiler would take
    tens of seconds) and refuses onnxruntime; a model without a decoder gets a note."""
    import densediff

    compiled = []

    def fake_compile(module):
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    img = tmp_path / "in.png"
    from PIL import Image

    Image.fromarray(torch.rand(32, 40, 3).mul(255).byte().numpy()).save(img)
    assert main(["predict", str(ddp_ckpt), str(img), "--out", str(tmp_path / "p"),
                 "--compile", "--steps", "2"]) == 0
    assert len(compiled) == 1 and compiled[0].__class__.__name__ == "DeformableDecoder"
    assert (tmp_path / "p" / "in_mask.png").is_file()
    one_line_error(capsys, main(["predict", str(tmp_path), str(img), "--out",
                                 str(tmp_path / "q"), "--runtime", "onnx", "--compile"]),
                   "--compile")
    p = densediff.load(ddp_ckpt)
    p.model.decoder = None
    assert p.compile() is p
    assert "no map decoder" in capsys.readouterr().err
