"""``densediff demo``: the whole path on built-in generated data, in a few minutes on a CPU.

1. train the small CNN segmentor on procedurally generated scenes;
2. evaluate the best checkpoint on the val and test splits (metrics JSON);
3. predict on test images and write masks, overlays and an image | truth | prediction grid.

Each demo writes a new time-stamped folder, so earlier results are never overwritten.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from densediff.config import load_config

DEMO_CONFIG = "generated/baseline.yaml"  # shipped in densediff/configs


def run_demo(out: Path, iters: int | None = None) -> Path:
    from densediff.api import colorize, load
    from densediff.data import build_dataset
    from densediff.engine.evaluate import evaluate
    from densediff.engine.trainer import train
    from densediff.tasks.segmentation import format_metrics

    run_dir = out / time.strftime("%Y%m%d-%H%M%S")
    overrides = [f"work_dir={run_dir}"] + ([f"train.iters={iters}"] if iters else [])
    cfg = load_config(DEMO_CONFIG, overrides)

    print(f"[demo] 1/3 training -> {run_dir}")
    t0 = time.time()
    train(cfg)
    print(f"[demo] trained in {time.time() - t0:.0f} s")

    print("[demo] 2/3 evaluating best checkpoint")
    ckpt = run_dir / "checkpoints" / "best.safetensors"
    predictor = load(ckpt)
    results = {}
    for split in ("val", "test"):
        ds = build_dataset(predictor.cfg, split, train=False)
        metrics = evaluate(predictor.model, ds, predictor.cfg, progress=False)
        results[split] = metrics
        print(f"[demo] {split}:\n{format_metrics(metrics, predictor.class_names)}")
    (run_dir / "demo_metrics.json").write_text(json.dumps(results, indent=1, default=float))

    print("[demo] 3/3 predicting on test images")
    pred_dir = run_dir / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    ds = build_dataset(predictor.cfg, "test", train=False)
    rows = []
    for i in range(min(6, len(ds))):
        rgb, gt, path = ds.load(i)
        stem = Path(path).name
        pred = predictor.predict(rgb)
        gt_color = colorize(gt, predictor.palette, predictor.cfg.data.ignore_index)
        Image.fromarray(pred.color).save(pred_dir / f"{stem}_color.png")
        Image.fromarray(pred.overlay).save(pred_dir / f"{stem}_overlay.png")
        rows.append(np.concatenate([rgb, gt_color, pred.color], axis=1))
    grid = np.concatenate(rows, axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(
        run_dir / "demo_grid.png")
    print(f"[demo] wrote {run_dir / 'demo_grid.png'} (image | truth | prediction), "
          f"{pred_dir}, {run_dir / 'demo_metrics.json'}")
    return run_dir
