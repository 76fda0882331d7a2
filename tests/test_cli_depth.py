"""Depth end to end: training DDP and its twin through the CLI, multi-step evaluation with
uncertainty scores, predict outputs (colour, 16-bit PNG, .npy, uncertainty, trajectory), the
Python API, a KITTI-layout evaluation, bad input, and a learning run that must beat the best
constant depth."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import densediff
from densediff.api import DepthPrediction
from densediff.cli.main import main
from densediff.criteria.depth import best_constant_depth
from densediff.data.check import CHECK_FORMATS
from densediff.engine.trainer import train
from densediff.limits import DATA_CHECK_FORMATS
from densediff.tasks import build_dataset, load_config
from densediff.testing import tiny
from densediff.testing.assertions import one_line_error
from densediff.testing.fixtures import write_kitti, write_random_image
from densediff.testing.runs import train_generated

TINY = tiny.TINY["generated/depth_ddp.yaml"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return train_generated(tmp_path_factory.mktemp("depth"), "depth", ("ddp", "twin"), TINY)


def ckpt(runs, name="ddp"):
    return str(runs / name / "checkpoints" / "best.safetensors")


def test_training_keeps_the_lowest_abs_rel(runs):
    """Two evaluations (iterations 2 and 4) on the real val split: ``best`` is the one with
    the lower AbsRel (scripted scores in both directions: ``test_engine_train``)."""
    import csv

    from densediff.utils.checkpoint import load_metadata

    with open(runs / "ddp" / "metrics.csv") as f:
        evals = [(float(r["abs_rel"]), int(r["iter"])) for r in csv.DictReader(f) if r.get("abs_rel")]
    assert [it for _, it in evals] == [2, 4] and evals[0][0] != evals[1][0]
    meta = load_metadata(runs / "ddp" / "checkpoints" / "best.safetensors")
    assert meta["iteration"] == min(evals)[1]
    assert meta["abs_rel"] == pytest.approx(min(evals)[0], rel=1e-5)  # metrics.csv: 6 digits
    cfg = (runs / "ddp" / "config.yaml").read_text()
    assert "task: depth" in cfg and "class_names:\n  - depth" in cfg


def test_eval_steps_table_json_and_uncertainty(runs, capsys, tmp_path):
    out = tmp_path / "val.json"
    assert main(["eval", ckpt(runs), "--steps", "1,3", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "abs_rel" in text and "pearson-steps" in text and "AUSE-steps" in text
    m = json.loads(out.read_text())
    assert list(m["steps"]) == ["1", "3"]
    r1, r3 = m["steps"]["1"], m["steps"]["3"]
    for r in (r1, r3):
        assert 0 <= r["d1"] <= 1 and r["abs_rel"] > 0 and r["images"] == 3
    assert r1["uncertainty"] == {}                      # one step: no spread
    assert set(r3["uncertainty"]) == {"steps"}
    assert -1 <= r3["uncertainty"]["steps"]["pearson"] <= 1
    assert (tmp_path / "val_steps.png").is_file()
    # random starts give the second uncertainty map
    assert main(["eval", ckpt(runs), "model.diffusion.randsteps=3", "--steps", "2", "--out",
                 str(out), "--quiet"]) == 0
    assert set(json.loads(out.read_text())["steps"]["2"]["uncertainty"]) == {"steps", "starts"}


def test_twin_eval_and_flip_test(runs, capsys):
    assert main(["eval", ckpt(runs, "twin"), "--quiet"]) == 0
    plain = capsys.readouterr().out
    assert main(["eval", ckpt(runs, "twin"), "--aug-test", "--quiet"]) == 0
    flipped = capsys.readouterr().out
    assert "with flip" in flipped and "abs_rel" in plain
    assert plain.splitlines()[-1] != flipped.splitlines()[-1]   # the flip pass changes numbers


def test_predict_writes_depth_pictures_raw_png_and_uncertainty(runs, tmp_path):
    src = write_random_image(tmp_path / "imgs")
    out = tmp_path / "pred"
    assert main(["predict", ckpt(runs), str(src), "--out", str(out), "--steps", "3",
                 "--uncertainty", "--trajectory"]) == 0
    depth = np.load(out / "a_depth.npy")
    assert depth.shape == (30, 41) and depth.dtype == np.float32
    assert (depth >= 1e-3).all() and (depth <= 10).all()
    raw = np.asarray(Image.open(out / "a_depth16.png"))
    assert raw.dtype == np.uint16                       # generated scenes: millimetres
    assert np.abs(raw / 1000.0 - depth).max() <= 0.0005 + 1e-6
    assert np.asarray(Image.open(out / "a_depth.png")).shape == (30, 41, 3)
    unc = np.load(out / "a_uncertainty.npy")
    assert unc.shape == (30, 41) and (unc >= 0).all()
    picture = np.asarray(Image.open(out / "a_trajectory.png"))  # labelled grid
    assert picture.ndim == 3 and picture.shape[1] > 5 * 41


def test_python_api_depth_prediction(runs):
    model = densediff.load(ckpt(runs))
    img = np.random.default_rng(1).integers(0, 255, (40, 52, 3), dtype=np.uint8)
    out = model.predict(img, steps=4, seed=3)
    assert isinstance(out, DepthPrediction)
    assert out.depth.shape == (40, 52) and out.trajectory.shape == (4, 40, 52)
    assert np.allclose(out.trajectory[-1].clip(1e-3, 10), out.depth, atol=1e-5)
    again = model.predict(img, steps=4, seed=3)
    assert np.array_equal(again.depth, out.depth)       # seeded noise
    assert not np.array_equal(model.predict(img, steps=4, seed=4).trajectory, out.trajectory)
    flip = model.predict(img, aug=True)
    assert flip.uncertainty is None and flip.steps == 3
    twin = densediff.load(ckpt(runs, "twin")).predict(img)
    assert twin.steps is None and twin.trajectory is None


def test_eval_on_kitti_layout(runs, tmp_path, capsys):
    root = write_kitti(tmp_path / "kitti", n=3)
    code = main(["eval", ckpt(runs), "data.dataset=kitti", "data.depth.max_depth=80",
                 "data.depth.eval_crop=garg", "--data-root", str(root), "--split", "test",
                 "--quiet", "--steps", "2"])
    assert code == 0
    text = capsys.readouterr().out
    assert "kitti/test" in text and "abs_rel" in text
    assert main(["data", "check", str(root), "--format", "kitti"]) == 0


def test_bad_input_gives_one_line(runs, capsys, tmp_path):
    code = main(["eval", ckpt(runs, "twin"), "--steps", "2"])
    one_line_error(capsys, code, "not a diffusion model")
    code = main(["eval", ckpt(runs), "--guidance", "0.4"])
    one_line_error(capsys, code, "not a DDPS model")
    code = main(["train", "configs/generated/depth_ddp.yaml", "data.dataset=camvid",
                 f"work_dir={tmp_path / 'x'}"])
    one_line_error(capsys, code, "not a depth dataset")
    code = main(["eval", ckpt(runs), "data.dataset=folder", "--data-root", str(tmp_path)])
    one_line_error(capsys, code, "data.depth.depth_scale")


def test_bench_depth_models(runs, capsys):
    for name in ("ddp", "twin"):
        steps = ["--steps", "1,3"] if name == "ddp" else []  # the twin takes no step count
        assert main(["bench", f"configs/generated/depth_{name}.yaml", "--size", "32", "32",
                     "--repeats", "1", *steps, "--variants", "eager,fast"]) == 0
    assert "decoder step" in capsys.readouterr().out


def test_cli_data_check_formats_match_the_checker():
    assert set(DATA_CHECK_FORMATS) == set(CHECK_FORMATS)


@pytest.mark.slow  # a 300-iteration training (~1 min on 2 free cores)
def test_short_training_beats_the_best_constant_depth(tmp_path):
    """~40 s: DDP on 64 x 64 generated scenes; the val AbsRel at 3 steps must fall well below
    that of the oracle constant depth (the best single depth for the val maps themselves)."""
    cfg = load_config("generated/depth_ddp.yaml", [
        "data.gen_size=[64,64]", "data.train_pipeline.crop_size=[64,64]", "data.gen_num_val=16",
        "data.train_pipeline.photometric=false", "data.depth.rotate=0", "train.iters=300",
        "train.lr=4e-3", "train.eval_interval=300", "train.ckpt_interval=300",
        "train.log_interval=100", "train.progress=false", f"work_dir={tmp_path / 'run'}"])
    torch.set_num_threads(2)
    metrics = train(cfg)
    val = build_dataset(cfg, "val", train=False)
    _, const = best_constant_depth([val[i]["label"][None] for i in range(len(val))], 1e-3, 10.0)
    assert metrics["abs_rel"] < 0.8 * const["abs_rel"], (metrics["abs_rel"], const["abs_rel"])
    assert metrics["d1"] > const["d1"] + 0.1


def test_info_on_a_depth_config(capsys):
    assert main(["info", "configs/generated/depth_ddp.yaml", "data.gen_size=[32,48]"]) == 0
    text = capsys.readouterr().out
    assert "3 sampling steps" in text and "classes: depth" in text
