"""End-to-end training on tiny generated scenes (simple_cnn): run folder, loss, guards."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from densediff.engine import trainer as T
from densediff.errors import CheckpointError, ConfigError
from densediff.models.interface import MapModel
from densediff.tasks import load_config, spec_for
from densediff.testing import tiny
from densediff.testing.runs import tiny_config
from densediff.utils.checkpoint import load_metadata, load_train_state, load_weights

TINY = tiny.QUICK_BASELINE


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One short run shared by the tests below: (cfg, returned metrics)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    # overfit two images without augmentation: a clear loss decrease within 30 iterations
    cfg = tiny_config(tmp_path_factory.mktemp("run") / "w", "train.iters=30",
                      "train.warmup_iters=3", "train.lr=1e-2", "train.log_interval=1",
                      "train.eval_interval=15", "train.ckpt_interval=10", "data.gen_num_train=2",
                      "data.train_pipeline.ratio_range=null", "data.train_pipeline.flip_prob=0",
                      "data.train_pipeline.photometric=false")
    return cfg, T.train(cfg)


def test_loss_falls_and_run_folder_is_complete(run):
    cfg, metrics = run
    wd = Path(cfg.work_dir)
    rows = list(csv.DictReader(open(wd / "metrics.csv")))
    losses = [float(r["loss"]) for r in rows if r["loss"]]
    assert len(losses) == 30
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])
    evals = [r for r in rows if r["mIoU"]]
    assert [int(r["iter"]) for r in evals] == [15, 30]
    assert all(float(r["lr"]) > 0 for r in rows if r["lr"])

    for name in ("config.yaml", "train.log", "checkpoints/last.safetensors",
                 "checkpoints/best.safetensors", "checkpoints/last.state.pt"):
        assert (wd / name).is_file(), name
    assert any((wd / "tb").iterdir())
    assert not (wd / "checkpoints/last_ema.safetensors").exists()  # EMA is off

    assert set(metrics) >= {"aAcc", "mIoU", "mAcc", "mBIoU", "per_class", "best_mIoU"}
    assert metrics["iter"] == 30 and 0 <= metrics["mIoU"] <= 100
    assert metrics["best_mIoU"] == pytest.approx(max(float(r["mIoU"]) for r in evals), rel=1e-5)

    meta = load_metadata(wd / "checkpoints/best.safetensors")
    assert meta["iteration"] == metrics["best_iter"] and meta["kind"] == "model"
    saved_cfg = meta["config"]
    assert saved_cfg["data"]["class_names"] and saved_cfg["data"]["palette"]  # self-contained
    assert len(saved_cfg["data"]["class_names"]) == meta["num_classes"]
    state = load_train_state(wd / "checkpoints/last.state.pt")
    assert state["iteration"] == 30 and state["samples"] == 60
    last, _ = load_weights(wd / "checkpoints/last.safetensors")
    assert all(torch.isfinite(v).all() for v in last.values() if v.is_floating_point())


def test_refuses_to_overwrite_and_to_resume_nothing(run, tmp_path):
    cfg, _ = run
    with pytest.raises(ConfigError, match="already holds checkpoints.*--resume"):
        T.train(cfg)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        T.train(tiny_config(tmp_path / "fresh"), resume=True)
    with pytest.raises(ConfigError, match="work_dir"):
        T.train(tiny_config(tmp_path / "x").model_copy(update={"work_dir": None}))


def test_work_dir_that_is_a_file_is_refused_before_building_anything(tmp_path):
    (tmp_path / "runfile").write_text("not a folder")
    with pytest.raises(ConfigError, match="runfile is a file, not a folder"):
        T.train(tiny_config(tmp_path / "runfile"))


def test_resume_of_a_finished_run_only_evaluates(run):
    cfg, metrics = run
    again = T.train(cfg, resume=True)
    assert again["iter"] == 30 and again["mIoU"] == metrics["mIoU"]


def test_divergence_stops_before_writing(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path / "w", "train.iters=6", "train.ckpt_interval=2",
                      "train.eval_interval=100", "train.ema.enabled=true")
    real_step, calls = T.train_step, []

    def step(model, *args, **kwargs):
        calls.append(1)
        losses, norm = real_step(model, *args, **kwargs)
        if len(calls) == 3:  # poison the weights as a diverging step would
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
            return losses, math.nan
        return losses, norm

    monkeypatch.setattr(T, "train_step", step)
    with pytest.raises(T.DivergenceError,
                       match="iteration 3: .*NaN or inf.*checkpoints/last is iteration 2 "):
        T.train(cfg)
    ckpt = tmp_path / "w" / "checkpoints"
    assert load_metadata(ckpt / "last.safetensors")["iteration"] == 2
    assert load_metadata(ckpt / "last_ema.safetensors")["kind"] == "ema"
    assert load_train_state(ckpt / "last.state.pt")["iteration"] == 2


class _ConstantModel(MapModel):
    """Predicts class ``c`` everywhere (at whatever resolution it is given)."""

    def __init__(self, num_classes: int, c: int):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.nn.functional.one_hot(
            torch.tensor(c), num_classes).float())

    def predict_map(self, img):
        return self.logits[None, :, None, None].expand(img.shape[0], -1, *img.shape[-2:])


def test_evaluate_scores_at_original_size(tmp_path):
    from densediff.criteria.segmentation import SegMetric
    from densediff.engine.evaluate import evaluate
    from densediff.tasks import build_dataset

    cfg = tiny_config(tmp_path, "data.test_scale=[16,16]")  # model input 16x16, labels 32x32
    ds = build_dataset(cfg, "val", train=False)
    model = _ConstantModel(ds.num_classes, c=1).train()
    got = evaluate(model, ds, cfg, progress=False)
    assert model.training  # mode restored
    want = SegMetric(ds.num_classes, ds.ignore_index, cfg.eval.boundary_dilation)
    for i in range(len(ds)):
        label = ds[i]["label"]
        assert tuple(label.shape) == (32, 32)
        want.update(torch.ones_like(label), label)
    want = want.compute()
    assert got["aAcc"] == pytest.approx(want["aAcc"]) and 0 < got["aAcc"] < 100
    assert got["mIoU"] == pytest.approx(want["mIoU"])
    # a segmentor's softmax entropy is scored as an uncertainty map too (constant here: the
    # same entropy everywhere ranks nothing, so AUROC is chance)
    assert set(got["uncertainty"]) == {"entropy"}
    assert got["uncertainty"]["entropy"]["AUROC"] == pytest.approx(50.0)


@pytest.mark.parametrize("config, metric, values", [
    ("generated/baseline.yaml", "mIoU", [10.0, 30.0, 30.0, 20.0]),    # higher is better
    ("generated/depth_twin.yaml", "abs_rel", [0.5, 0.2, 0.2, 0.3]),   # lower is better
])
def test_best_checkpoint_is_the_best_of_several_evaluations(tmp_path, monkeypatch, config, metric,
                                                             values):
    """Four evaluations (iterations 2, 4, 6, 8) with scripted scores: ``best`` must be the
    weights evaluated at iteration 4, the first of the two best scores in the metric's own
    direction. Keeping the last (8), the first (2), ties (6) or the other direction (2) each
    fails."""
    import densediff.engine.evaluate as E
    DEPTH_TINY = tiny.TINY["generated/depth_ddp.yaml"]

    base = TINY if "baseline" in config else DEPTH_TINY
    cfg = load_config(config, [f"work_dir={tmp_path / 'w'}", *base, "train.iters=8",
                               "train.warmup_iters=1", "train.eval_interval=2",
                               "train.ckpt_interval=2", "train.log_interval=2",
                               "train.progress=false"])
    assert spec_for(cfg).best_metric(cfg) == metric
    scores, seen = iter(values), []

    def scripted(module, dataset, cfg, progress=False):
        seen.append({k: v.detach().clone() for k, v in module.state_dict().items()})
        return {metric: next(scores)}

    monkeypatch.setattr(E, "evaluate", scripted)
    metrics = T.train(cfg)
    assert len(seen) == 4
    assert metrics["best_iter"] == 4 and metrics[f"best_{metric}"] == values[1]
    ckpt = tmp_path / "w" / "checkpoints"
    meta = load_metadata(ckpt / "best.safetensors")
    assert meta["iteration"] == 4 and meta[metric] == values[1]
    best, _ = load_weights(ckpt / "best.safetensors")
    moved = [k for k in best if not torch.equal(seen[1][k], seen[3][k])]
    assert moved  # training moved the weights between the evaluations
    assert all(torch.equal(best[k], seen[1][k]) for k in best)
    assert load_train_state(ckpt / "last.state.pt")["best_iter"] == 4
