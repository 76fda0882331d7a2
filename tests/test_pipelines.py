"""The task table (densediff.pipelines): one pipeline per task, step counts resolved and checked
in one place, results that save their own files with labelled pictures, and the architecture
contract (import-linter) that keeps layers pointing down."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import densediff.viz
from densediff.errors import UserError
from densediff.models.interface import MapModel
from densediff.pipelines import (
    BEVPrediction,
    DepthPrediction,
    Prediction,
    resolve_steps,
)
from densediff.tasks import TASKS, spec_for

ROOT = Path(__file__).resolve().parents[1]


def test_the_task_table_holds_every_task_once():
    assert list(TASKS) == ["segmentation", "depth", "bev"]
    pipes = [spec.pipeline for spec in TASKS.values()]
    assert len({type(p) for p in pipes}) == len(pipes)  # one pipeline per task
    for task, spec in TASKS.items():
        assert spec.name == task and spec_for(task) is spec
        assert spec.headline in spec.metrics
    assert TASKS["depth"].headline == "abs_rel" and "abs_rel" in TASKS["depth"].lower_is_better
    assert {k for k in TASKS["depth"].metrics
            if k not in TASKS["depth"].lower_is_better} == {"d1", "d2", "d3"}
    assert not TASKS["bev"].pipeline.has_aug and not TASKS["bev"].pipeline.image_input


class _Sampler(torch.nn.Module):
    """The step interface of a diffusion model, nothing else."""

    min_steps, max_steps, default_steps = 1, 7, 3
    max_steps_reason = "seven trained timesteps"

    def sample_steps(self, feat, steps, seeds=None):  # pragma: no cover - never sampled here
        raise AssertionError


def test_resolve_steps_one_place_for_defaults_dedup_and_range():
    m = _Sampler()
    assert resolve_steps(m, None) == [3]
    assert resolve_steps(m, 5) == [5] and resolve_steps(m, np.int64(2)) == [2]
    assert resolve_steps(m, [1, 5, 1, 2]) == [1, 5, 2]
    with pytest.raises(UserError, match=r"--steps: ckpt takes step counts 1\.\.7 \(seven"):
        resolve_steps(m, [2, 8], "ckpt", "--steps")
    with pytest.raises(UserError, match="steps: .* 1..7"):
        resolve_steps(m, 0)
    plain = MapModel()  # steps 0 only: discriminative
    assert resolve_steps(plain, None) == [0]
    with pytest.raises(UserError, match="steps: this checkpoint is not a diffusion model"):
        resolve_steps(plain, 3, "this checkpoint")


def _record(monkeypatch) -> dict:
    keys: dict = {}
    save = densediff.viz.save_labelled_grid

    def recording(rows, columns, path, *args, **kw):
        name = Path(path).name  # files are drawn at their temporary name, then renamed
        m = re.match(r"^\.(.+)\.tmp\d+\.\w+$", name)
        keys[m.group(1) if m else name] = save(rows, columns, path, *args, **kw)
        return keys[m.group(1) if m else name]

    monkeypatch.setattr(densediff.viz, "save_labelled_grid", recording)
    return keys


def test_segmentation_prediction_saves_every_file_and_labelled_pictures(tmp_path, monkeypatch):
    keys = _record(monkeypatch)
    rng = np.random.default_rng(0)
    h, w, k = 12, 16, 3
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    traj = rng.integers(0, k, (3, h, w))
    probs = rng.random((k, h, w)).astype(np.float32)
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    pred = Prediction(mask=traj[-1], probs=probs, color=palette[traj[-1]],
                      overlay=image, steps=3, uncertainty=rng.random((h, w), np.float32),
                      entropy=rng.random((h, w), np.float32), trajectory=traj,
                      base_mask=traj[0], image=image, class_names=["a", "b", "c"],
                      palette=palette)
    written = pred.save(tmp_path, "x", uncertainty=True, trajectory=True, save_probs=True)
    assert set(written) == {"mask.png", "color.png", "overlay.png", "entropy.png",
                            "uncertainty.png", "base.png", "compare.png", "trajectory.png",
                            "probs.npy"}
    for name in written:
        assert (tmp_path / f"x_{name}").is_file()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "x_mask.png")), traj[-1])
    assert np.load(tmp_path / "x_probs.npy").dtype == np.float16
    t = keys["x_trajectory.png"]
    assert t.columns == ["image", "base segmentor (step 0)", "step 1 of 3", "step 2 of 3",
                         "step 3 of 3", "uncertainty"]
    assert t.legend == ["a", "b", "c"] and "label changed" in t.colorbars[-1]
    c = keys["x_compare.png"]
    assert c.columns == ["image", "base segmentor", "refined by DDPS (3 steps)"]


def test_depth_and_bev_predictions_label_their_trajectories(tmp_path, monkeypatch):
    keys = _record(monkeypatch)
    rng = np.random.default_rng(1)
    d = rng.uniform(1, 5, (2, 8, 10)).astype(np.float32)
    pred = DepthPrediction(depth=d[-1], color=np.zeros((8, 10, 3), np.uint8), steps=2,
                           uncertainty=d.std(0), trajectory=d, min_depth=0.5, max_depth=8.0,
                           depth_scale=1000.0)
    written = pred.save(tmp_path, "d", uncertainty=True, trajectory=True)
    assert "trajectory.png" in written and "uncertainty.npy" in written
    raw = np.asarray(Image.open(tmp_path / "d_depth16.png"))
    assert np.abs(raw / 1000.0 - d[-1]).max() <= 0.0005 + 1e-6
    t = keys["d_trajectory.png"]
    assert t.columns == ["step 1 of 2", "step 2 of 2", "uncertainty"]
    assert "depth (m)" in t.colorbars[0] and "(m)" in t.colorbars[-1]

    masks = rng.random((3, 2, 6, 6)) > 0.5
    bev = BEVPrediction(probs=masks[-1].astype(np.float32), masks=masks[-1],
                        color=np.zeros((6, 6, 3), np.uint8), steps=3,
                        uncertainty=rng.random((2, 6, 6), np.float32), trajectory=masks,
                        cameras=[np.zeros((4, 8, 3), np.uint8)] * 6, truth=masks[0],
                        class_names=["road", "line"],
                        palette=np.array([[9, 9, 9], [200, 0, 0]], np.uint8))
    written = bev.save(tmp_path, "b", uncertainty=True, trajectory=True)
    assert {"bev.png", "map.png", "probs.npy", "trajectory.png"} <= set(written)
    t = keys["b_trajectory.png"]
    assert t.columns == ["step 1 of 3", "step 2 of 3", "step 3 of 3", "uncertainty"]
    assert t.legend == ["road", "line", "no map class"]


@pytest.mark.skipif(shutil.which("lint-imports", path=str(Path(sys.executable).parent)) is None,
                    reason="import-linter not installed")
def test_architecture_contract_layers_point_down_and_no_cycles():
    exe = Path(sys.executable).parent / "lint-imports"
    r = subprocess.run([str(exe), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "layers only point down KEPT" in r.stdout
    assert "no import cycles inside a package KEPT" in r.stdout
