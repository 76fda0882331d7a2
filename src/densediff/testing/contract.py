"""The contract every task passes (``tests/test_contract.py`` runs it for each task of
:data:`densediff.tasks.TASKS`; a new task proves itself by passing it)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from densediff.api import Predictor
from densediff.data import collate
from densediff.models.interface import OUTPUT_KINDS, DenseModel, Trajectory, is_diffusion
from densediff.tasks import load_config, spec_for

__all__ = ["check_task_contract"]


def check_task_contract(config: str, overrides: list[str], tmp_path: Path) -> None:
    """The contract, for the model of ``config`` with ``overrides`` (tiny sizes)."""
    torch.manual_seed(0)
    cfg = load_config(config, [*overrides, f"work_dir={tmp_path / 'run'}"])
    spec = spec_for(cfg)
    names, palette = spec.class_info(cfg)
    cfg.data.class_names, cfg.data.palette = list(names), [tuple(map(int, c)) for c in palette]
    model = spec.build_model(cfg, len(names))

    # the one interface
    assert isinstance(model, DenseModel) and model.output_kind in OUTPUT_KINDS
    assert model.output_kind == spec.output_kind
    assert model.min_steps <= model.default_steps
    assert model.max_steps is None or model.default_steps <= model.max_steps

    # one training step
    train_set = spec.build_dataset(cfg, cfg.data.train_split, True)
    batch = collate([train_set[(0, 0)], train_set[(1, 0)]])
    losses = model.forward_train(batch["image"], batch["label"])
    losses["loss"].backward()
    assert math.isfinite(float(losses["loss"].detach()))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())

    # sampling at the step bounds, scored by the task's metric
    model.eval()
    val = spec.build_dataset(cfg, cfg.data.val_split, False)
    item = collate([val[0]])
    top = model.max_steps if model.max_steps is not None else model.default_steps + 2
    metric = spec.pipeline.metric(val, cfg, torch.device("cpu"))
    with torch.no_grad():
        feat = model.extract(item["image"])
        for n in sorted({model.min_steps, model.default_steps, top}):
            traj = model.sample_steps(feat, n, seeds=[3])
            assert isinstance(traj, Trajectory) and traj.kind == model.output_kind
            assert len(traj.steps) == max(n, 1)
            out = traj.output(model.accumulation)
            assert traj.step_outputs().shape == (max(n, 1), *out.shape)
            h, w = item["meta"][0]["ori_size"]
            spec.pipeline.score_trajectory(model, metric, traj, item["label"][..., :h, :w])
    metric.reduce()
    assert spec.headline in metric.compute()
    assert is_diffusion(model) == (top != 0)

    # predict through the API and save the files
    predictor = Predictor(model, cfg, list(names), np.asarray(palette, np.uint8))
    steps = model.default_steps if is_diffusion(model) else None
    if spec.pipeline.image_input:
        pred = predictor.predict(val.load(0)[0], steps=steps, seed=1)
    else:
        pred = predictor.predict(val[0], steps=steps, seed=1)
    written = pred.save(tmp_path / "pred", "x")
    assert written and all((tmp_path / "pred" / f"x_{k}").is_file() for k in written)

    # export where the table says it can
    if spec.export_refusal or cfg.model.type == "ddps":
        return
    pytest.importorskip("onnxruntime")
    from densediff.deploy import export_model, load_onnx_model

    size = tuple(item["image"].shape[-2:])
    export_model(model, cfg, tmp_path / "onnx", size=size)
    rt = load_onnx_model(tmp_path / "onnx")
    assert isinstance(rt, DenseModel) and rt.output_kind == model.output_kind
    with torch.no_grad():
        want = model.predict_map(item["image"], steps=steps, seeds=[3])
        got = rt.predict_map(item["image"], steps=steps, seeds=[3])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
