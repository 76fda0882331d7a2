"""``densediff demo``: the whole path on built-in generated data, in a few minutes on a CPU.

For each task (segmentation: generated shape scenes; depth: generated 3-D rooms; BEV: generated
road layouts seen by six surround cameras):

1. train a small DDP model (CNN encoder + deformable map decoder) on procedurally generated
   scenes;
2. evaluate the best checkpoint on the val and test splits at several sampling step counts
   (dynamic inference, one pass per split), with the uncertainty scores: metrics JSON, a table
   and the metric-vs-steps curve;
3. predict on test images and write masks / colourised depth / BEV maps, overlays,
   uncertainty heatmaps, per-step trajectory strips and an image | truth | prediction | error |
   uncertainty grid (BEV: cameras | prediction | truth | uncertainty).

Each demo writes a new time-stamped folder, so earlier results are never overwritten.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from densediff.config import load_config

DEMO_CONFIG = "generated/ddp.yaml"  # shipped in densediff/configs
DEMO_STEPS = [1, 2, 3, 5, 10]
DEPTH_DEMO_CONFIG = "generated/depth_ddp.yaml"
DEPTH_DEMO_STEPS = [1, 3, 5]
DEPTH_DEMO_ITERS = 1000
"""The depth demo trains 1000 of the config's 2500 iterations (~5 min on 2 CPU cores)."""
BEV_DEMO_CONFIG = "generated/bev_ddp.yaml"
BEV_DEMO_STEPS = [1, 3, 5]
BEV_DEMO_ITERS = 300
"""The BEV demo trains 300 of the config's 2000 iterations (~6 min on 2 CPU cores)."""
TASKS = ("segmentation", "depth", "bev", "all")


def run_demo(out: Path, iters: int | None = None, task: str = "all",
             overrides: list[str] | None = None) -> list[Path]:
    """Run the segmentation, depth and/or BEV demo (``task``: segmentation | depth | bev |
    all); each writes a new ``out/<timestamp>-<task>`` folder, returned in order.
    ``overrides`` (dotted config changes) are applied to each."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = []
    if task in ("segmentation", "all"):
        runs.append(_segmentation_demo(out / f"{stamp}-segmentation", iters, overrides or []))
    if task in ("depth", "all"):
        runs.append(_depth_demo(out / f"{stamp}-depth", iters, overrides or []))
    if task in ("bev", "all"):
        runs.append(_bev_demo(out / f"{stamp}-bev", iters, overrides or []))
    return runs


def _train_and_evaluate(config: str, run_dir: Path, iters: int | None, overrides: list[str],
                        steps: list[int]):
    """Steps 1 and 2 of the demo: train, then evaluate val and test at ``steps``; returns the
    loaded best checkpoint (a Predictor)."""
    from densediff.api import load
    from densediff.data import build_dataset
    from densediff.engine.evaluate import evaluate_steps
    from densediff.engine.trainer import train
    from densediff.viz import plot_steps, steps_table

    cfg = load_config(config, [f"work_dir={run_dir}"]
                      + ([f"train.iters={iters}"] if iters else []) + overrides)
    print(f"[demo] 1/3 training DDP ({cfg.task}) -> {run_dir}")
    t0 = time.time()
    train(cfg)
    print(f"[demo] trained in {time.time() - t0:.0f} s")

    print(f"[demo] 2/3 evaluating the best checkpoint at {steps} sampling steps")
    predictor = load(run_dir / "checkpoints" / "best.safetensors")
    results = {}
    for split in ("val", "test"):
        ds = build_dataset(predictor.cfg, split, train=False)
        res = evaluate_steps(predictor.model, ds, predictor.cfg, steps, progress=False)
        results[split] = {str(n): m for n, m in res.items()}
        print(f"[demo] {split}:\n{steps_table(res)}")
        plot_steps(res, run_dir / f"demo_steps_{split}.png", title=f"generated {split}")
    (run_dir / "demo_metrics.json").write_text(json.dumps(results, indent=1, default=float))
    return predictor


def _segmentation_demo(run_dir: Path, iters: int | None, overrides: list[str]) -> Path:
    from densediff.api import colorize
    from densediff.data import build_dataset
    from densediff.viz import heatmap, save_grid

    predictor = _train_and_evaluate(DEMO_CONFIG, run_dir, iters, overrides, DEMO_STEPS)
    print("[demo] 3/3 predicting on test images")
    pred_dir = run_dir / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    ds = build_dataset(predictor.cfg, "test", train=False)
    rows = []
    steps = predictor.model.default_steps
    for i in range(min(6, len(ds))):
        rgb, gt, path = ds.load(i)
        stem = Path(path).name
        pred = predictor.predict(rgb, steps=steps, seed=i)
        gt_color = colorize(gt, predictor.palette, predictor.cfg.data.ignore_index)
        error = np.repeat(((pred.mask != gt) & (gt != predictor.cfg.data.ignore_index))
                          [..., None] * 255, 3, axis=2).astype(np.uint8)
        unc = heatmap(pred.uncertainty)
        Image.fromarray(pred.color).save(pred_dir / f"{stem}_color.png")
        Image.fromarray(pred.overlay).save(pred_dir / f"{stem}_overlay.png")
        Image.fromarray(unc).save(pred_dir / f"{stem}_uncertainty.png")
        Image.fromarray(heatmap(pred.entropy)).save(pred_dir / f"{stem}_entropy.png")
        traj = predictor.predict(rgb, steps=DEMO_STEPS[-1], seed=i)
        Image.fromarray(predictor.trajectory_strip(traj, rgb)).save(
            pred_dir / f"{stem}_trajectory.png")
        rows.append(np.concatenate([rgb, gt_color, pred.color, error, unc], axis=1))
    save_grid(rows, run_dir / "demo_grid.png")
    print(f"[demo] wrote {run_dir / 'demo_grid.png'} (image | truth | prediction | error | "
          f"uncertainty at {steps} steps), {run_dir}/demo_steps_{{val,test}}.png, {pred_dir} "
          f"(masks, overlays, uncertainty, {DEMO_STEPS[-1]}-step trajectories), "
          f"{run_dir / 'demo_metrics.json'}")
    return run_dir


def _depth_demo(run_dir: Path, iters: int | None, overrides: list[str]) -> Path:
    from densediff.api import load
    from densediff.data import build_dataset
    from densediff.viz import depth_color, heatmap, save_grid, scaled_heatmap

    _train_and_evaluate(DEPTH_DEMO_CONFIG, run_dir, iters or DEPTH_DEMO_ITERS, overrides,
                        DEPTH_DEMO_STEPS)
    print("[demo] 3/3 predicting depth on test scenes (4 random starts per image)")
    # the spread over random starts is the better depth uncertainty (benchmarks/RESULTS.md §7)
    predictor = load(run_dir / "checkpoints" / "best.safetensors",
                     overrides=["model.diffusion.randsteps=4"])
    pred_dir = run_dir / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    dd = predictor.cfg.data.depth
    ds = build_dataset(predictor.cfg, "test", train=False)
    rows = []
    for i in range(min(6, len(ds))):
        rgb, gt, path = ds.load(i)
        stem = Path(path).name
        pred = predictor.predict(rgb, steps=DEPTH_DEMO_STEPS[-1], seed=i)
        valid = gt > 0
        err = np.where(valid, np.abs(pred.depth - gt) / np.where(valid, gt, 1), 0.0)
        err_pic = heatmap(err / 0.5)  # AbsRel 0.5 and above: the brightest
        err_pic[~valid] = 0
        unc = pred.uncertainty_starts
        unc_pic = scaled_heatmap(unc)
        gt_pic = depth_color(gt, dd.min_depth, dd.max_depth)
        gt_pic[~valid] = 0
        Image.fromarray(pred.color).save(pred_dir / f"{stem}_depth.png")
        Image.fromarray(unc_pic).save(pred_dir / f"{stem}_uncertainty.png")
        Image.fromarray(predictor.trajectory_strip(pred, rgb)).save(
            pred_dir / f"{stem}_trajectory.png")
        rows.append(np.concatenate([rgb, gt_pic, pred.color, err_pic, unc_pic], axis=1))
    save_grid(rows, run_dir / "demo_grid.png")
    print(f"[demo] wrote {run_dir / 'demo_grid.png'} (image | truth | prediction | AbsRel error "
          f"| uncertainty = depth spread over 4 random starts, {DEPTH_DEMO_STEPS[-1]} steps), "
          f"{run_dir}/demo_steps_{{val,test}}.png, {pred_dir} (colourised depth, uncertainty, "
          f"trajectories), {run_dir / 'demo_metrics.json'}")
    return run_dir


def _bev_demo(run_dir: Path, iters: int | None, overrides: list[str]) -> Path:
    from densediff.viz import save_grid

    predictor = _train_and_evaluate(BEV_DEMO_CONFIG, run_dir, iters or BEV_DEMO_ITERS,
                                    overrides, BEV_DEMO_STEPS)
    print("[demo] 3/3 predicting BEV maps of test scenes")
    pred_dir = run_dir / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    ds = predictor.dataset("test")
    rows = []
    for i in range(min(4, len(ds))):
        sample = ds[i]
        pred = predictor.predict_bev(sample, steps=BEV_DEMO_STEPS[-1], seed=i)
        panel = predictor.bev_panel(sample, pred)
        stem = f"test_{i:03d}"
        Image.fromarray(panel).save(pred_dir / f"{stem}_bev.png")
        Image.fromarray(predictor.trajectory_strip(pred)).save(pred_dir / f"{stem}_trajectory.png")
        rows.append(panel)
    save_grid(rows, run_dir / "demo_grid.png", zoom=1)
    print(f"[demo] wrote {run_dir / 'demo_grid.png'} (six cameras | predicted map | truth | "
          f"uncertainty at {BEV_DEMO_STEPS[-1]} steps), {run_dir}/demo_steps_{{val,test}}.png, "
          f"{pred_dir} (panels, trajectories), {run_dir / 'demo_metrics.json'}")
    return run_dir
