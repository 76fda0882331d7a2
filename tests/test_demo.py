"""`densediff demo` end to end on tiny settings: every task writes its run folder, metrics
for every demo step count, step curves, the picture grid and per-image pictures."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from densediff.demo import BEV_DEMO_STEPS, DEMO_STEPS, DEPTH_DEMO_STEPS, run_demo

TINY = ["data.gen_size=[32,48]", "data.gen_num_train=8", "data.gen_num_val=2",
        "data.gen_num_test=2", "data.train_pipeline.crop_size=[32,48]", "data.batch_size=2",
        "model.encoder.variant=tiny", "model.neck.channels=16", "model.neck.num_groups=4",
        "model.head.channels=16", "model.head.num_layers=1", "model.head.num_heads=4",
        "model.head.ffn_channels=32", "model.aux_head.channels=16",
        "model.diffusion.embed_channels=16", "train.warmup_iters=1", "train.eval_interval=4",
        "train.ckpt_interval=4", "train.progress=false",
        # BEV: small cameras and grid (ignored by the other tasks)
        "data.bev.gen_image_size=[32,88]", "data.bev.image_size=[32,88]",
        "data.bev.xbound=[-12,12,0.5]", "data.bev.ybound=[-12,12,0.5]",
        "data.bev.feat_xbound=[-12.8,12.8,0.8]", "data.bev.feat_ybound=[-12.8,12.8,0.8]",
        "data.bev.dbound=[1,17,1]", "model.bev.camera_channels=8", "model.bev.fused_channels=16",
        "model.bev.bev_blocks=1", "data.num_workers=0"]


def test_demo_runs_every_task(tmp_path):
    seg, depth, bev = run_demo(tmp_path, iters=4, task="all", overrides=TINY)
    assert seg.name.endswith("-segmentation") and depth.name.endswith("-depth")
    assert bev.name.endswith("-bev")
    metrics = json.loads((bev / "demo_metrics.json").read_text())
    assert list(metrics["test"]) == [str(n) for n in BEV_DEMO_STEPS]
    assert all("mIoU@0.50" in m for m in metrics["test"].values())
    grid = np.asarray(Image.open(bev / "demo_grid.png"))
    h = 2 * 32 + 2  # 2 test scenes: rows of six 32 x 88 cameras beside 3 square tiles
    assert grid.shape == (2 * h, 3 * 88 + 2 * 2 + 3 * (4 + h), 3)
    strip = np.asarray(Image.open(bev / "predictions" / "test_000_trajectory.png"))
    assert strip.shape == (48, (BEV_DEMO_STEPS[-1] + 1) * 48 + BEV_DEMO_STEPS[-1] * 4, 3)
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
