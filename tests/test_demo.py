"""`densediff demo` end to end on tiny settings: both tasks write their run folders, metrics
for every demo step count, step curves, the picture grid and per-image pictures."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from densediff.demo import DEMO_STEPS, DEPTH_DEMO_STEPS, run_demo

TINY = ["data.gen_size=[32,48]", "data.gen_num_train=8", "data.gen_num_val=2",
        "data.gen_num_test=2", "data.train_pipeline.crop_size=[32,48]", "data.batch_size=2",
        "model.encoder.variant=tiny", "model.neck.channels=16", "model.neck.num_groups=4",
        "model.head.channels=16", "model.head.num_layers=1", "model.head.num_heads=4",
        "model.head.ffn_channels=32", "model.aux_head.channels=16",
        "model.diffusion.embed_channels=16", "train.warmup_iters=1", "train.eval_interval=4",
        "train.ckpt_interval=4", "train.progress=false"]


def test_demo_runs_both_tasks(tmp_path):
    seg, depth = run_demo(tmp_path, iters=4, task="all", overrides=TINY)
    assert seg.name.endswith("-segmentation") and depth.name.endswith("-depth")
    for run, steps, key in ((seg, DEMO_STEPS, "mIoU"), (depth, DEPTH_DEMO_STEPS, "abs_rel")):
        metrics = json.loads((run / "demo_metrics.json").read_text())
        assert list(metrics) == ["val", "test"]
        assert list(metrics["test"]) == [str(n) for n in steps]
        assert all(key in m for m in metrics["test"].values())
        for split in ("val", "test"):
            assert (run / f"demo_steps_{split}.png").is_file()
        grid = np.asarray(Image.open(run / "demo_grid.png"))
        assert grid.shape == (2 * 2 * 32, 2 * 5 * 48, 3)     # 2 test images, 5 tiles, x2 zoom
    assert (depth / "predictions" / "00000_depth.png").is_file()
    strip = np.asarray(Image.open(depth / "predictions" / "00000_trajectory.png"))
    assert strip.shape[1] == (2 + DEPTH_DEMO_STEPS[-1]) * 48 + (1 + DEPTH_DEMO_STEPS[-1]) * 4
