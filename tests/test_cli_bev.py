"""BEV end to end: training DDP and its twin (camera-only and camera+LiDAR) through the CLI on the
generated world, multi-step evaluation with the IoU-at-thresholds table and uncertainty, predict
pictures from a split, the Python API, bench and info, training and evaluation on a nuScenes
fixture written in the real format, bad input, and a learning run that must beat the best
constant prediction."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import densediff
from densediff.api import BEVPrediction
from densediff.cli.main import main
from densediff.criteria.bev import constant_iou
from densediff.engine.trainer import train
from densediff.tasks import build_dataset, load_config
from densediff.testing import tiny
from densediff.testing.assertions import one_line_error
from densediff.testing.fixtures import write_nuscenes
from densediff.testing.runs import train_generated
from densediff.testing.tiny import BEV_WORLD as SMALL_WORLD

TINY = tiny.TINY["generated/bev_ddp.yaml"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return train_generated(tmp_path_factory.mktemp("bev"), "bev", ("ddp", "twin", "ddp_lidar"),
                           TINY)


def ckpt(runs, name="ddp"):
    return str(runs / name / "checkpoints" / "best.safetensors")


def test_training_keeps_the_best_miou(runs):
    """Two evaluations (iterations 2 and 4) on the real val split: ``best`` is the one with
    the higher mIoU, or the first on a tie (scripted scores in both directions:
    ``test_engine_train``)."""
    import csv

    from densediff.utils.checkpoint import load_metadata

    with open(runs / "ddp" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    evals = [(float(r["mIoU"]), int(r["iter"])) for r in rows if r.get("mIoU")]
    assert [it for _, it in evals] == [2, 4]
    best = max(evals, key=lambda e: (e[0], -e[1]))
    meta = load_metadata(runs / "ddp" / "checkpoints" / "best.safetensors")
    assert meta["iteration"] == best[1]
    assert meta["mIoU"] == pytest.approx(best[0], rel=1e-5)  # metrics.csv keeps 6 digits
    assert "mIoU@0.50" in rows[0] and "loss_drivable_area" in rows[0]
    cfg = (runs / "ddp" / "config.yaml").read_text()
    assert "task: bev" in cfg and "- divider" in cfg


def test_eval_steps_table_json_and_uncertainty(runs, capsys, tmp_path):
    out = tmp_path / "val.json"
    assert main(["eval", ckpt(runs), "--steps", "1,3", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "drivable_" in text and "mIoU@0.5" in text and "AUROC-steps" in text
    metrics = json.loads(out.read_text())["steps"]
    assert set(metrics) == {"1", "3"}
    m = metrics["3"]
    assert len(m["table"]["divider"]) == 7 and m["thresholds"][0] == pytest.approx(0.35)
    assert m["mIoU"] == pytest.approx(np.nanmean(list(m["per_class"].values())))
    assert set(m["uncertainty"]) == {"steps", "entropy"}
    assert (tmp_path / "val_steps.png").is_file()
    assert main(["eval", ckpt(runs, "twin"), "--split", "test", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "mIoU (mean of best)" in text and "0.35" in text


def test_lidar_model_evaluates_with_points(runs, capsys, monkeypatch):
    """``eval`` of the camera+LiDAR run feeds each sample's LiDAR points to the pillar
    encoder (spied): real points, inside the grid, and its output is non-zero."""
    from densediff.encoders.bev import PillarEncoder

    seen = []
    forward = PillarEncoder.forward

    def spy(self, points, mask=None):
        out = forward(self, points, mask)
        real = points[mask] if mask is not None else points.reshape(-1, points.shape[-1])
        seen.append((real.shape[0], float(out.abs().sum())))
        return out

    monkeypatch.setattr(PillarEncoder, "forward", spy)
    assert main(["eval", ckpt(runs, "ddp_lidar"), "--quiet", "--steps", "1"]) == 0
    assert "mIoU" in capsys.readouterr().out
    assert len(seen) >= 1 and all(n > 100 and total > 0 for n, total in seen), seen
    model = densediff.load(ckpt(runs, "ddp_lidar")).model
    assert model.view.lidar is not None
    seen.clear()
    assert main(["eval", ckpt(runs, "ddp"), "--quiet", "--steps", "1"]) == 0
    assert seen == []  # the camera-only run never reads points


def test_predict_writes_bev_pictures_from_a_split(runs, tmp_path):
    out = tmp_path / "pred"
    assert main(["predict", ckpt(runs), "test", "--out", str(out), "--limit", "1",
                 "--uncertainty", "--trajectory", "--steps", "2"]) == 0
    stem = "generated_test_00000"
    panel = np.asarray(Image.open(out / f"{stem}_bev.png"))
    # two rows of three 32 x 88 cameras (2-pixel gaps) beside 3 square tiles (4-pixel gaps)
    h = 2 * 32 + 2
    assert panel.shape == (h, (3 * 88 + 2 * 2) + 3 * (4 + h), 3)
    assert np.asarray(Image.open(out / f"{stem}_map.png")).shape == (48, 48, 3)
    probs = np.load(out / f"{stem}_probs.npy")
    assert probs.shape == (6, 48, 48) and probs.min() >= 0 and probs.max() <= 1
    unc = np.load(out / f"{stem}_uncertainty.npy")
    assert unc.shape == (6, 48, 48) and set(np.unique(unc)) <= {0.0, 1.0}  # 2 steps: 0 or 1 change
    picture = np.asarray(Image.open(out / f"{stem}_trajectory.png"))  # labelled grid
    assert picture.ndim == 3 and picture.shape[1] > 3 * 48
    # --batch-size: samples in batches of 2 (one forward pass each), bit-identical maps
    out2 = tmp_path / "pred2"
    assert main(["predict", ckpt(runs), "test", "--out", str(out2), "--limit", "2",
                 "--steps", "2", "--batch-size", "2"]) == 0
    assert np.array_equal(np.load(out2 / f"{stem}_probs.npy"), probs)
    assert (out2 / "generated_test_00001_map.png").is_file()


def test_python_api_bev_prediction(runs):
    model = densediff.load(ckpt(runs))
    ds = model.dataset("val")
    pred = model.predict(ds[0], steps=3, seed=1)
    assert isinstance(pred, BEVPrediction) and pred.steps == 3
    assert pred.probs.shape == (6, 48, 48) and pred.masks.dtype == bool
    assert np.array_equal(pred.masks, pred.probs >= 0.5)
    assert pred.trajectory.shape == (3, 6, 48, 48)
    again = model.predict(ds[0], steps=3, seed=1)
    assert np.array_equal(again.probs, pred.probs)  # seeded
    assert not np.array_equal(model.predict(ds[0], steps=3, seed=2).probs, pred.probs)
    twin = densediff.load(ckpt(runs, "twin")).predict(ds[0])
    assert twin.uncertainty is None and twin.steps is None


def test_bad_input_gives_one_line(runs, capsys, tmp_path):
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    with pytest.raises(densediff.errors.UserError, match="multi-camera"):
        densediff.load(ckpt(runs)).predict(img)
    code = main(["predict", ckpt(runs), "test", "--out", str(tmp_path / "o"), "--aug-test"])
    one_line_error(capsys, code, "--aug-test")
    code = main(["predict", ckpt(runs, "twin"), "test", "--out", str(tmp_path / "o"), "--steps", "2"])
    one_line_error(capsys, code, "--steps", "not a diffusion model")
    code = main(["train", "configs/generated/bev_ddp.yaml", "model.aux_head.enabled=true",
                 f"work_dir={tmp_path / 'x'}"])
    one_line_error(capsys, code, "aux_head")


def test_bench_and_info_on_bev_configs(capsys):
    assert main(["bench", "configs/generated/bev_ddp.yaml", *TINY, "--steps", "1,3",
                 "--repeats", "1"]) == 0
    text = capsys.readouterr().out
    assert "extra-step ratio" in text and "input 1x3x32x88" in text
    assert main(["info", "configs/generated/bev_ddp_lidar.yaml", *TINY]) == 0
    text = capsys.readouterr().out
    assert "sample (6 cameras) at 32x88" in text and "classes: drivable_area" in text


def test_train_and_eval_on_a_nuscenes_fixture(tmp_path, capsys):
    root = tmp_path / "nuscenes"
    write_nuscenes(root, image_size=(90, 160))
    assert main(["data", "check", str(root), "--format", "nuscenes"]) == 0
    over = [f"data.root={root}", "data.bev.version=v1.0-mini", "data.bev.image_size=[32,64]",
            "data.bev.resize_range=[0.35,0.45]", "data.bev.test_resize=0.4",
            "data.bev.lidar_sweeps=2", "data.num_workers=0", *TINY[7:],
            f"work_dir={tmp_path / 'run'}"]
    assert main(["train", "configs/nuscenes/ddp_cl_swin_t.yaml", "model.encoder.name=simple_cnn",
                 "model.encoder.variant=tiny", "model.encoder.drop_path=0", *over]) == 0
    assert main(["eval", str(tmp_path / "run" / "checkpoints" / "best.safetensors"), "--steps", "1",
                 "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "nuscenes/val" in text and "walkway" in text
    (next((root / "samples" / "CAM_BACK").iterdir())).unlink()
    code = main(["data", "check", str(root), "--format", "nuscenes"])
    assert code == 1 and "CAM_BACK" in capsys.readouterr().out


@pytest.mark.slow  # a short BEV training (~1 min on 2 free cores)
def test_short_training_beats_the_best_constant_prediction(tmp_path):
    """~1 min: camera-only DDP on a small generated world (+-12 m); the val mIoU at 3 steps
    must be well above that of the best constant prediction."""
    cfg = load_config("generated/bev_ddp.yaml", SMALL_WORLD + [
        "data.gen_num_val=16", "data.num_workers=0", "train.iters=150", "train.lr=3e-3",
        "train.eval_interval=150", "train.ckpt_interval=150", "train.log_interval=50",
        "train.progress=false", f"work_dir={tmp_path / 'run'}"])
    torch.set_num_threads(2)
    metrics = train(cfg)
    val = build_dataset(cfg, "val", train=False)
    const = constant_iou([val[i]["label"][None] for i in range(len(val))], val.class_names)
    assert metrics["mIoU"] > const["mIoU"] + 10, (metrics["per_class"], const["per_class"])
    drive = metrics["per_class"]["drivable_area"]
    assert drive > const["per_class"]["drivable_area"] + 5, (drive, const["per_class"])
