"""``densediff demo``: the whole path on built-in generated data, in a few minutes on a CPU.

For each task (segmentation: generated shape scenes; depth: generated 3-D rooms; BEV: generated
road layouts seen by six surround cameras):

1. train a small DDP model (CNN encoder + deformable map decoder) on procedurally generated
   scenes;
2. evaluate the best checkpoint on the val and test splits at several sampling step counts
   (dynamic inference, one pass per split), with the uncertainty scores: metrics JSON, a table
   and the metric-vs-steps curve;
3. predict on test images and write masks / colourised depth / BEV maps, overlays,
   uncertainty heatmaps, per-step trajectory strips and ``demo_grid.png``, an image | truth |
   prediction | error | uncertainty grid (BEV: cameras | predicted map | truth | uncertainty)
   with column titles, the class legend and colour bars that say what the colours mean.

``make demo`` / ``densediff demo`` run the segmentation demo (about 4 minutes on 2 CPU cores);
``--task depth|bev|all`` (``make demo-depth``, ``demo-bev``, ``demo-all``) the others. Each demo
writes a new time-stamped folder, so earlier results are never overwritten.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from densediff.errors import UserError
from densediff.limits import MAX_DEMO_ITERS
from densediff.tasks import load_config

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
DEFAULT_TASK = "segmentation"


def check_demo_options(out: str | os.PathLike, iters: int | None, task: str) -> None:
    """Reject bad demo options before any work, with a one-line :class:`UserError` naming the
    option: ``task`` one of :data:`TASKS`; ``iters`` None (each demo's default) or a whole
    number in 1 .. :data:`MAX_DEMO_ITERS`; ``out`` a folder that is (or can be made) writable."""
    if task not in TASKS:
        raise UserError(f"--task: must be one of {', '.join(TASKS)}, got {task!r}")
    if iters is not None:
        if isinstance(iters, bool) or not isinstance(iters, (int, np.integer)):
            raise UserError(f"--iters: expected a whole number of training iterations, got "
                            f"{iters!r}")
        if iters < 1:
            raise UserError(f"--iters: training iterations must be at least 1, got {iters} "
                            f"(leave --iters out for each demo's default)")
        if iters > MAX_DEMO_ITERS:
            raise UserError(f"--iters: at most {MAX_DEMO_ITERS} for the demo, got {iters} "
                            f"(longer runs: densediff train <config> train.iters=N)")
    if not str(out).strip():
        raise UserError("--out: expected a folder, got an empty path")
    path = Path(out).absolute()
    if path.exists() and not path.is_dir():
        raise UserError(f"--out: {out} exists and is not a folder")
    parent = next(p for p in (path, *path.parents) if p.exists())
    if not parent.is_dir():
        from densediff.utils.checks import path_kind

        raise UserError(f"--out: cannot make {out}: {parent} is {path_kind(parent)}, not a "
                        "folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out: cannot write in {parent} (permission denied)")


def run_demo(out: str | os.PathLike, iters: int | None = None, task: str = DEFAULT_TASK,
             overrides: list[str] | None = None) -> list[Path]:
    """Run the segmentation (default), depth and/or BEV demo (``task``: segmentation | depth |
    bev | all); each writes a new ``out/<timestamp>-<task>`` folder, returned in order.
    ``iters``: training iterations (None: each demo's default). ``overrides`` (dotted config
    changes) are applied to each. Bad options raise :class:`UserError` before any work
    (:func:`check_demo_options`)."""
    check_demo_options(out, iters, task)
    out = Path(out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = []
    for name in (list(DEMOS) if task == "all" else [task]):
        d = DEMOS[name]
        run_dir = out / f"{stamp}-{name}"
        predictor = _train_and_evaluate(d.config, run_dir, d.iters if iters is None else iters,
                                        overrides or [], d.steps)
        d.predictions(predictor, run_dir, d.steps)
        runs.append(run_dir)
    if task != "all":
        others = "|".join(t for t in TASKS if t != task)
        print(f"[demo] the other demos: densediff demo --task {others} (make demo-depth, "
              "make demo-bev, make demo-all)")
    return runs


def _train_and_evaluate(config: str, run_dir: Path, iters: int | None, overrides: list[str],
                        steps: list[int]):
    """Steps 1 and 2 of the demo: train, then evaluate val and test at ``steps``; returns the
    loaded best checkpoint (a Predictor)."""
    from densediff.api import load
    from densediff.engine.evaluate import evaluate_steps
    from densediff.engine.trainer import train
    from densediff.tasks import build_dataset, spec_for
    from densediff.viz import plot_steps

    cfg = load_config(config, [f"work_dir={run_dir}"]
                      + ([f"train.iters={iters}"] if iters is not None else []) + overrides)
    print(f"[demo] 1/3 training DDP ({cfg.task}) -> {run_dir}")
    t0 = time.time()
    train(cfg)
    print(f"[demo] trained in {time.time() - t0:.0f} s")

    print(f"[demo] 2/3 evaluating the best checkpoint at {steps} sampling steps")
    predictor = load(run_dir / "checkpoints" / "best.safetensors")
    spec = spec_for(predictor.cfg)
    pipe = spec.pipeline
    results = {}
    for split in ("val", "test"):
        ds = build_dataset(predictor.cfg, split, train=False)
        res = evaluate_steps(predictor.model, ds, predictor.cfg, steps, progress=False)
        results[split] = {str(n): m for n, m in res.items()}
        print(f"[demo] {split}:\n{pipe.steps_table(res)}")
        plot_steps(res, run_dir / f"demo_steps_{split}.png", pipe.plot_keys or (spec.headline,),
                   pipe.plot_ylabel, title=f"generated {split}")
    (run_dir / "demo_metrics.json").write_text(json.dumps(results, indent=1, default=float))
    return predictor


def _segmentation_predictions(predictor, run_dir: Path, demo_steps: list[int]) -> None:
    from densediff.tasks import build_dataset
    from densediff.viz import ColorScale, GridColumn, colorize, heatmap, save_labelled_grid

    print("[demo] 3/3 predicting on test images")
    pred_dir = run_dir / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    ds = build_dataset(predictor.cfg, "test", train=False)
    rows = []
    steps = predictor.model.default_steps
    ignore = predictor.cfg.data.ignore_index
    any_ignored = False
    for i in range(min(6, len(ds))):
        rgb, gt, path = ds.load(i)
        stem = Path(path).name
        pred = predictor.predict(rgb, steps=steps, seed=i)
        gt_color = colorize(gt, predictor.palette, ignore)
        any_ignored |= bool((gt == ignore).any())
        error = np.repeat(((pred.mask != gt) & (gt != ignore))
                          [..., None] * 255, 3, axis=2).astype(np.uint8)
        unc = heatmap(pred.uncertainty)
        Image.fromarray(pred.color).save(pred_dir / f"{stem}_color.png")
        Image.fromarray(pred.overlay).save(pred_dir / f"{stem}_overlay.png")
        Image.fromarray(unc).save(pred_dir / f"{stem}_uncertainty.png")
        Image.fromarray(heatmap(pred.entropy)).save(pred_dir / f"{stem}_entropy.png")
        traj = predictor.predict(rgb, steps=demo_steps[-1], seed=i)
        traj.save_trajectory(pred_dir / f"{stem}_trajectory.png")
        rows.append([rgb, gt_color, pred.color, error, unc])
    legend = list(zip(predictor.class_names, predictor.palette.tolist()))
    if any_ignored:
        legend.append(("not scored (ignore)", (0, 0, 0)))
    save_labelled_grid(
        rows, [GridColumn("image"), GridColumn("truth"),
               GridColumn(f"prediction ({steps} sampling steps)"),
               GridColumn("error", swatches=(("wrong class", (255, 255, 255)),
                                             ("right" + (" or not scored" if any_ignored
                                                         else ""), (0, 0, 0)))),
               GridColumn("uncertainty (label changes between steps)",
                          ColorScale("inferno", 0, 1, f"share of the {steps - 1} step-to-step "
                                     "transitions at which the pixel's label changed: "
                                     "0 = never (sure), 1 = at every step"))],
        run_dir / "demo_grid.png", legend=legend, legend_title="classes",
        title=f"Segmentation DDP on generated test scenes ({len(rows)} images)")
    print(f"[demo] wrote {run_dir / 'demo_grid.png'} (image | truth | prediction | error | "
          f"uncertainty at {steps} steps), {run_dir}/demo_steps_{{val,test}}.png, {pred_dir} "
          f"(masks, overlays, uncertainty, {demo_steps[-1]}-step trajectories), "
          f"{run_dir / 'demo_metrics.json'}")


def _depth_predictions(_trained, run_dir: Path, demo_steps: list[int]) -> None:
    from densediff.api import load
    from densediff.tasks import build_dataset
    from densediff.viz import ColorScale, GridColumn, nice_ceil, save_labelled_grid, scaled_heatmap

    print("[demo] 3/3 predicting depth on test scenes (4 random starts per image)")
    # the spread over random starts is the better depth uncertainty (benchmarks/RESULTS.md §7)
    predictor = load(run_dir / "checkpoints" / "best.safetensors",
                     overrides=["model.diffusion.randsteps=4"])
    pred_dir = run_dir / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    dd = predictor.cfg.data.depth
    ds = build_dataset(predictor.cfg, "test", train=False)
    depth_scale = ColorScale("magma_r", dd.min_depth, dd.max_depth,
                             "depth (m): bright = near, dark = far")
    err_scale = ColorScale("inferno", 0, 0.5, "relative error |predicted - true| / true "
                           "(AbsRel; 0.5 and above: brightest)", extend="max")
    shown = []
    for i in range(min(6, len(ds))):
        rgb, gt, path = ds.load(i)
        stem = Path(path).name
        pred = predictor.predict(rgb, steps=demo_steps[-1], seed=i)
        unc = pred.uncertainty_starts
        Image.fromarray(pred.color).save(pred_dir / f"{stem}_depth.png")
        Image.fromarray(scaled_heatmap(unc)).save(pred_dir / f"{stem}_uncertainty.png")
        pred.save_trajectory(pred_dir / f"{stem}_trajectory.png")
        shown.append((rgb, gt, pred.depth, unc))
    # one uncertainty scale for the whole grid (metres), so that rows compare
    unc_scale = ColorScale("inferno", 0, nice_ceil(max(float(u.max()) for *_, u in shown)),
                           f"spread (std) of the depth over {predictor.cfg.model.diffusion.randsteps}"
                           " random starts (m): bright = unsure")
    no_gt = (128, 128, 128)
    any_invalid = False
    rows = []
    for rgb, gt, depth, unc in shown:
        valid = gt > 0
        any_invalid |= bool((~valid).any())
        err = np.where(valid, np.abs(depth - gt) / np.where(valid, gt, 1), 0.0)
        gt_pic, err_pic = depth_scale.colorize(gt), err_scale.colorize(err)
        gt_pic[~valid] = err_pic[~valid] = no_gt
        rows.append([rgb, gt_pic, depth_scale.colorize(depth), err_pic, unc_scale.colorize(unc)])
    missing = (("no true depth", no_gt),) if any_invalid else ()
    save_labelled_grid(
        rows, [GridColumn("image"), GridColumn("true depth", depth_scale, missing),
               GridColumn(f"predicted depth ({demo_steps[-1]} sampling steps)",
                          depth_scale),
               GridColumn("error (AbsRel)", err_scale, missing),
               GridColumn("uncertainty (spread over random starts)", unc_scale)],
        run_dir / "demo_grid.png",
        title=f"Depth DDP on generated 3-D rooms: test scenes ({len(rows)} images)")
    print(f"[demo] wrote {run_dir / 'demo_grid.png'} (image | truth | prediction | AbsRel error "
          f"| uncertainty = depth spread over 4 random starts, {demo_steps[-1]} steps), "
          f"{run_dir}/demo_steps_{{val,test}}.png, {pred_dir} (colourised depth, uncertainty, "
          f"trajectories), {run_dir / 'demo_metrics.json'}")


_SIX_CAMERAS = ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK",
                "CAM_BACK_RIGHT")


def _bev_predictions(predictor, run_dir: Path, demo_steps: list[int]) -> None:
    from densediff.viz import ColorScale, GridColumn, bev_color, camera_mosaic, save_labelled_grid

    print("[demo] 3/3 predicting BEV maps of test scenes")
    pred_dir = run_dir / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    ds = predictor.dataset("test")
    d = predictor.cfg.data
    mean, std = np.asarray(d.mean, np.float32), np.asarray(d.std, np.float32)
    rows = []
    for i in range(min(4, len(ds))):
        sample = ds[i]
        pred = predictor.predict(sample, steps=demo_steps[-1], seed=i)
        stem = f"test_{i:03d}"
        Image.fromarray(pred.panel()).save(pred_dir / f"{stem}_bev.png")
        pred.save_trajectory(pred_dir / f"{stem}_trajectory.png")
        cams = [np.clip(im.permute(1, 2, 0).numpy() * std + mean, 0, 255).astype(np.uint8)
                for im in sample["image"]["images"]]
        rows.append([camera_mosaic(cams), pred.color,
                     bev_color(sample["label"].numpy(), predictor.palette),
                     pred.uncertainty_picture()])
    b = d.bev
    extent = f"{b.xbound[1] - b.xbound[0]:g} x {b.ybound[1] - b.ybound[0]:g} m"
    cams = ("six cameras (top: front-left, front, front-right; bottom: back-left, back, "
            "back-right)" if tuple(b.cameras) == _SIX_CAMERAS else
            f"cameras ({', '.join(b.cameras)})")
    save_labelled_grid(
        rows, [GridColumn(cams),
               GridColumn(f"predicted map ({demo_steps[-1]} sampling steps)"),
               GridColumn("true map"),
               GridColumn("uncertainty (mask changes between steps)",
                          ColorScale("inferno", 0, 1, f"largest share, over the classes, of the "
                                     f"{demo_steps[-1] - 1} step-to-step transitions at which "
                                     "the class mask changed: 0 = never (sure), 1 = every step"))],
        run_dir / "demo_grid.png",
        legend=[*zip(predictor.class_names, predictor.palette.tolist()),
                ("no map class", (255, 255, 255))],
        legend_title="map classes (later ones drawn on top)",
        title=f"BEV map DDP on the generated world: test scenes ({len(rows)}); maps "
              f"{extent} around the car, forward up, left on the left")
    print(f"[demo] wrote {run_dir / 'demo_grid.png'} (six cameras | predicted map | truth | "
          f"uncertainty at {demo_steps[-1]} steps), {run_dir}/demo_steps_{{val,test}}.png, "
          f"{pred_dir} (panels, trajectories), {run_dir / 'demo_metrics.json'}")


@dataclass(frozen=True)
class Demo:
    """One task's demo: its config, training iterations (None: the config's), the step
    counts evaluated, and what it predicts and draws after training (step 3 of 3)."""

    config: str
    iters: int | None
    steps: list[int]
    predictions: Callable[..., None]


DEMOS: dict[str, Demo] = {
    "segmentation": Demo(DEMO_CONFIG, None, DEMO_STEPS, _segmentation_predictions),
    "depth": Demo(DEPTH_DEMO_CONFIG, DEPTH_DEMO_ITERS, DEPTH_DEMO_STEPS, _depth_predictions),
    "bev": Demo(BEV_DEMO_CONFIG, BEV_DEMO_ITERS, BEV_DEMO_STEPS, _bev_predictions),
}
"""The demos, keyed by task (``--task``; ``all`` runs them in this order)."""
