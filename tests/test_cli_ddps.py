"""DDPS through the CLI and the API: training on a frozen base run, EMA checkpoints, a
self-contained checkpoint, eval with the base at steps 0, predict pictures, bench, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import densediff
from densediff.cli.main import main
from densediff.tasks import load_config
from densediff.testing import tiny
from densediff.testing.assertions import one_line_error
from densediff.testing.fixtures import write_random_image
from densediff.testing.runs import copy_run
from densediff.testing.tiny import DDPS_UNET as DDPS_TINY

TINY = tiny.TINY["generated/baseline.yaml"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_baseline_run):
    root = tmp_path_factory.mktemp("ddps")
    copy_run(tiny_baseline_run, root / "base")  # the session's tiny baseline as the frozen base
    assert main(["train", "configs/generated/ddps.yaml", *TINY, *DDPS_TINY,
                 f"model.ddps.base={root / 'base'}", f"work_dir={root / 'ddps'}"]) == 0
    return root


def test_training_keeps_ema_and_raw_weights_and_a_self_contained_config(runs):
    ck = runs / "ddps/checkpoints"
    best, raw, ema = (load_file(ck / n) for n in ("best.safetensors", "last.safetensors",
                                                   "last_ema.safetensors"))
    key = "unet.init_conv.weight"
    assert torch.equal(best[key], ema[key]) and not torch.equal(best[key], raw[key])
    # the frozen base is inside, unchanged
    base = load_file(runs / "base/checkpoints/best.safetensors")
    for k, v in base.items():
        assert torch.equal(raw[f"base.{k}"], v), k
    cfg = load_config(runs / "ddps/config.yaml")
    assert cfg.model.ddps.base_config["model"]["type"] == "segmentor"
    # 2 EMA updates at decay 0.98: the run warns that the EMA is still mostly the init
    assert "96% of the EMA weights" in (runs / "ddps/train.log").read_text()


def test_eval_reports_the_base_at_step_0(runs, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["eval", str(runs / "ddps/checkpoints/best.safetensors"), "--steps", "0,1,3",
                 "--out", str(out), "--quiet"]) == 0
    m = json.loads(out.read_text())["steps"]
    assert list(m) == ["0", "1", "3"]
    base_out = tmp_path / "base.json"
    assert main(["eval", str(runs / "base/checkpoints/best.safetensors"), "--out",
                 str(base_out), "--quiet"]) == 0
    base = json.loads(base_out.read_text())
    assert m["0"]["mIoU"] == pytest.approx(base["mIoU"])
    assert m["0"]["aAcc"] == pytest.approx(base["aAcc"])
    capsys.readouterr()
    assert main(["eval", str(runs / "ddps/checkpoints/best.safetensors"), "--steps", "2",
                 "--guidance", "0.5", "--renoise", "posterior", "--quiet"]) == 0
    assert "steps: 2" in capsys.readouterr().out


def test_checkpoint_works_without_the_base_run(runs, tmp_path):
    moved = tmp_path / "ddps.safetensors"
    shutil.copy(runs / "ddps/checkpoints/best.safetensors", moved)
    hidden = tmp_path / "base_hidden"
    shutil.move(str(runs / "base"), hidden)
    try:
        model = densediff.load(moved)
        img = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
        pred = model.predict(img, steps=2, seed=1)
    finally:
        shutil.move(str(hidden), runs / "base")
    assert pred.mask.shape == (30, 40) and pred.base_mask.shape == (30, 40)
    assert pred.trajectory.shape == (2, 30, 40)
    np.testing.assert_array_equal(pred.mask, pred.trajectory[-1])
    base_only = model.predict(img, steps=0)
    np.testing.assert_array_equal(base_only.mask, pred.base_mask)


def test_predict_writes_base_comparison_and_trajectory(runs, tmp_path):
    src = write_random_image(tmp_path / "imgs")
    out = tmp_path / "pred"
    assert main(["predict", str(runs / "ddps/checkpoints/best.safetensors"), str(src), "--out",
                 str(out), "--steps", "3", "--uncertainty", "--trajectory",
                 "--guidance", "0.3"]) == 0
    assert np.asarray(Image.open(out / "a_base.png")).shape == (30, 41, 3)
    for kind in ("compare", "trajectory"):  # labelled grids
        picture = np.asarray(Image.open(out / f"a_{kind}.png"))
        assert picture.ndim == 3 and picture.shape[1] > 41 * 3


def test_bench_runs_on_a_ddps_config(runs, capsys):
    assert main(["bench", "configs/generated/ddps.yaml", *DDPS_TINY,
                 f"model.ddps.base={runs / 'base'}", "--size", "32", "32", "--repeats", "1",
                 "--steps", "1,3"]) == 0
    text = capsys.readouterr().out
    assert "model ddps (simple_cnn tiny)" in text and "extra-step ratio" in text


def test_user_errors(runs, tmp_path, capsys):
    code = main(["train", "configs/generated/ddps.yaml", *TINY, "model.ddps.base=null",
                 f"work_dir={tmp_path / 'a'}"])
    one_line_error(capsys, code, "model.ddps.base")
    code = main(["train", "configs/generated/ddps.yaml", *TINY,
                 f"model.ddps.base={tmp_path / 'missing'}", f"work_dir={tmp_path / 'b'}"])
    one_line_error(capsys, code, "model.ddps.base", "missing")
    code = main(["train", "configs/generated/ddps.yaml", *TINY, *DDPS_TINY,
                 f"model.ddps.base={runs / 'ddps'}", f"work_dir={tmp_path / 'd'}"])
    one_line_error(capsys, code, "not ddps")
    code = main(["eval", str(runs / "base/checkpoints/best.safetensors"), "--guidance", "0.4"])
    one_line_error(capsys, code, "--guidance", "not a DDPS model")
    code = main(["eval", str(runs / "ddps/checkpoints/best.safetensors"), "--steps", "11",
                 "--quiet"])
    one_line_error(capsys, code, "--steps", "0..10", "got 11")


def test_the_no_diffusion_control_trains_evaluates_predicts_and_benches(runs, capsys, tmp_path):
    """Table 7's control through the CLI: one call (eval --steps 0,1 = base vs control); step
    counts above 1 are refused in one line; bench times only what the model can run."""
    work = tmp_path / "control"
    assert main(["train", "configs/generated/ddps_control.yaml", *TINY, *DDPS_TINY,
                 "model.ddps.steps=1", f"model.ddps.base={runs / 'base'}",
                 f"work_dir={work}"]) == 0
    ck = str(work / "checkpoints" / "best.safetensors")
    out = tmp_path / "e.json"
    assert main(["eval", ck, "--steps", "0,1", "--quiet", "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())["steps"]) == {"0", "1"}
    capsys.readouterr()
    one_line_error(capsys, main(["eval", ck, "--steps", "1,2"]), "--steps",
                   "no-diffusion control makes one call")
    img = tmp_path / "img.png"
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(img)
    assert main(["predict", ck, str(img), "--out", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "img_mask.png").is_file()
    assert main(["bench", "configs/generated/ddps_control.yaml", *DDPS_TINY,
                 "model.ddps.steps=1", f"model.ddps.base={runs / 'base'}", "--size", "32",
                 "32", "--repeats", "1"]) == 0
    text = capsys.readouterr().out
    assert "total  1 step" in text and "total  3" not in text
    one_line_error(capsys, main(["bench", "configs/generated/ddps_control.yaml", *DDPS_TINY,
                                 "model.ddps.steps=1", f"model.ddps.base={runs / 'base'}",
                                 "--size", "32", "32", "--steps", "3"]), "--steps")
