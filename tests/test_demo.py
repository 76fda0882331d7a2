"""`densediff demo` end to end on tiny settings: every task writes its run folder, metrics
for every demo step count, step curves, the labelled picture grid (column titles, class legend,
colour bars with units) and per-image pictures; the default is the segmentation demo alone;
bad options end with one line naming the option before any work."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import densediff.viz
from densediff.cli.main import build_parser, main
from densediff.demo import BEV_DEMO_STEPS, DEFAULT_TASK, DEMO_STEPS, DEPTH_DEMO_STEPS, run_demo
from densediff.demo import MAX_DEMO_ITERS as MAX_ITERS
from densediff.errors import UserError
from densediff.viz import ColorScale, GridColumn, depth_color, grid_figure, grid_key

REPO = Path(__file__).resolve().parents[1]

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


def _record_grids(monkeypatch) -> dict:
    """Record the GridKey of every labelled grid the demo saves, by file path."""
    keys: dict = {}
    save = densediff.viz.save_labelled_grid

    def recording(rows, columns, path, *args, **kw):
        keys[Path(path)] = save(rows, columns, path, *args, **kw)
        return keys[Path(path)]

    monkeypatch.setattr(densediff.viz, "save_labelled_grid", recording)
    return keys


def test_demo_runs_every_task(tmp_path, monkeypatch):
    keys = _record_grids(monkeypatch)
    seg, depth, bev = run_demo(tmp_path, iters=4, task="all", overrides=TINY)
    assert seg.name.endswith("-segmentation") and depth.name.endswith("-depth")
    assert bev.name.endswith("-bev")
    metrics = json.loads((bev / "demo_metrics.json").read_text())
    assert list(metrics["test"]) == [str(n) for n in BEV_DEMO_STEPS]
    assert all("mIoU@0.50" in m for m in metrics["test"].values())
    k = keys[bev / "predictions" / "test_000_trajectory.png"]  # labelled, not a bare strip
    n = BEV_DEMO_STEPS[-1]
    assert k.columns == [f"step {s} of {n}" for s in range(1, n + 1)] + ["uncertainty"]
    assert k.legend[-1] == "no map class" and "class mask changed" in k.colorbars[-1]
    for run, steps, key in ((seg, DEMO_STEPS, "mIoU"), (depth, DEPTH_DEMO_STEPS, "abs_rel")):
        metrics = json.loads((run / "demo_metrics.json").read_text())
        assert list(metrics) == ["val", "test"]
        assert list(metrics["test"]) == [str(n) for n in steps]
        assert all(key in m for m in metrics["test"].values())
        for split in ("val", "test"):
            assert (run / f"demo_steps_{split}.png").is_file()
    assert (depth / "predictions" / "00000_depth.png").is_file()
    k = keys[depth / "predictions" / "00000_trajectory.png"]
    n = DEPTH_DEMO_STEPS[-1]
    assert k.columns == ["image"] + [f"step {s} of {n}" for s in range(1, n + 1)] + ["uncertainty"]
    assert all("depth (m)" in c for c in k.colorbars[1:-1]) and "(m)" in k.colorbars[-1]
    k = keys[seg / "predictions" / "00000_trajectory.png"]
    n = DEMO_STEPS[-1]
    assert k.columns == ["image"] + [f"step {s} of {n}" for s in range(1, n + 1)] + ["uncertainty"]
    assert k.legend_title == "classes" and "label changed" in k.colorbars[-1]

    # the picture grids: a readable PNG each, titled columns, legends and colour bars
    assert {p for p in keys if p.name == "demo_grid.png"} == {
        run / "demo_grid.png" for run in (seg, depth, bev)}
    for path in (run / "demo_grid.png" for run in (seg, depth, bev)):
        grid = np.asarray(Image.open(path))
        assert grid.ndim == 3 and grid.shape[0] > 2 * 32 and grid.shape[1] > 5 * 48
    k = keys[seg / "demo_grid.png"]
    assert [c.split(" (")[0] for c in k.columns] == ["image", "truth", "prediction", "error",
                                                     "uncertainty"]
    assert k.legend[:6] == ["sky", "ground", "disc", "square", "triangle", "ring"]
    assert k.legend_title == "classes"
    assert k.swatches[3][0] == "wrong class" and k.colorbars[:4] == ["", "", "", ""]
    assert "label changed" in k.colorbars[4] and "0 = never" in k.colorbars[4]
    k = keys[depth / "demo_grid.png"]
    assert [c.split(" (")[0] for c in k.columns] == ["image", "true depth", "predicted depth",
                                                     "error", "uncertainty"]
    assert k.colorbars[0] == "" and all("depth (m)" in k.colorbars[c] for c in (1, 2))
    assert "AbsRel" in k.colorbars[3] and "random starts (m)" in k.colorbars[4]
    k = keys[bev / "demo_grid.png"]
    assert [c.split(" (")[0] for c in k.columns] == ["six cameras", "predicted map", "true map",
                                                     "uncertainty"]
    assert k.legend == ["drivable_area", "ped_crossing", "walkway", "stop_line", "carpark_area",
                        "divider", "no map class"], k.legend
    assert "class mask changed" in k.colorbars[3] and "forward up" in k.title


def test_grid_figure_key_and_colours(tmp_path):
    tile = np.zeros((8, 12, 3), np.uint8)
    scale = ColorScale("inferno", 0, 2, "spread (m)", extend="max")
    cols = [GridColumn("image"), GridColumn("uncertainty", scale),
            GridColumn("error", swatches=(("wrong", (255, 255, 255)), ("right", (0, 0, 0))))]
    fig = grid_figure([[tile] * 3, [tile] * 3], cols, legend=[("a", (255, 0, 0)), ("b", (0, 0, 255))],
                      legend_title="classes", title="a grid")
    k = grid_key(fig)
    assert k.title == "a grid" and k.columns == ["image", "uncertainty", "error"]
    assert k.colorbars == ["", "spread (m)", ""] and k.swatches == [[], [], ["wrong", "right"]]
    assert k.legend == ["a", "b"] and k.legend_title == "classes"
    assert len(fig.axes) == 2 * 3 + 2  # six tiles, one colour bar, one swatch key
    key = densediff.viz.save_labelled_grid([[tile] * 3], cols, tmp_path / "g.png")
    assert key.columns == k.columns and key.legend == []
    assert Image.open(tmp_path / "g.png").size[0] > 3 * 12
    with pytest.raises(ValueError, match="one tile per column"):
        grid_figure([[tile] * 2], cols)
    # a scale colours values as its colour bar reads; the depth scale is depth_color's
    assert (scale.colorize(np.array([[0.0, 5.0]])) == densediff.viz.heatmap(
        np.array([[0.0, 1.0]]))).all()
    d = np.linspace(0.5, 10, 200).reshape(10, 20)
    assert (ColorScale("magma_r", 0.5, 10, "").colorize(d) == depth_color(d, 0.5, 10)).all()


def test_segmentation_is_the_default_demo():
    assert DEFAULT_TASK == "segmentation"
    assert build_parser().parse_args(["demo"]).task == "segmentation"
    assert run_demo.__defaults__[1] == "segmentation"


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_targets_run_one_demo_each():
    proc = subprocess.run(["make", "-n", "-W", "pyproject.toml", "demo", "demo-depth", "demo-bev",
                           "demo-all"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    demos = [ln.split(" demo", 1)[1].strip() for ln in proc.stdout.splitlines()
             if "densediff.cli.main demo" in ln]
    assert demos == ["--out demo_out", "--task depth --out demo_out", "--task bev --out demo_out",
                     "--task all --out demo_out"]


def _no_training(monkeypatch):
    import densediff.engine.trainer

    def fail(*a, **kw):
        raise AssertionError("the demo started training despite a bad option")

    monkeypatch.setattr(densediff.engine.trainer, "train", fail)


@pytest.mark.parametrize("argv, option", [
    (["--iters", "0"], "--iters"), (["--iters", "-3"], "--iters"),
    (["--iters", str(MAX_ITERS + 1)], "--iters"), (["--iters", "10**9"], "--iters"),
    (["--iters", "abc"], "--iters"), (["--iters", "2.5"], "--iters"), (["--iters", ""], "--iters"),
    (["--task", "segmentaton"], "--task"), (["--task", ""], "--task"),
    (["--out", ""], "--out"), (["--out", "FILE"], "--out"), (["--out", "FILE/sub"], "--out")])
def test_bad_demo_options_fail_in_one_line_before_any_work(argv, option, tmp_path, monkeypatch,
                                                           capsys):
    _no_training(monkeypatch)
    monkeypatch.chdir(tmp_path)
    Path("FILE").write_text("not a folder")
    argv = [a.replace("FILE", str(tmp_path / "FILE")) for a in argv]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "demo_out")]
    assert main(["demo", *argv, *out]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {option}: ") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]  # nothing written


def test_run_demo_rejects_bad_iters_before_any_work(tmp_path, monkeypatch):
    _no_training(monkeypatch)
    for iters in (0, -1, MAX_ITERS + 1, 2.0, True):
        with pytest.raises(UserError, match="--iters"):
            run_demo(tmp_path / "out", iters=iters)
    with pytest.raises(UserError, match="--task"):
        run_demo(tmp_path / "out", task="everything")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("n", [3, 150])
def test_grid_legend_sits_just_below_the_key_band_without_overlap(n):
    """The legend's height is measured, not estimated: from 3 classes to ADE20K's 150 it
    starts within 0.3 in below the lowest tile (no overlap, no large empty band)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    tile = np.zeros((40, 60, 3), np.uint8)
    cols = [GridColumn("image"), GridColumn("mask")]
    legend = [(f"class {i}" + "x" * (i % 13), (i, 255 - i, 0)) for i in range(n)]
    fig = grid_figure([[tile] * 2], cols, legend=legend, legend_title="classes")
    renderer = FigureCanvasAgg(fig).get_renderer()
    leg = fig.legends[0].get_window_extent(renderer)
    tiles = [ax.get_window_extent(renderer) for ax in fig.axes]
    gap = (min(t.y0 for t in tiles) - leg.y1) / fig.dpi
    assert 0 <= gap < 0.3, gap
    assert leg.y0 >= 0 and len(fig.legends[0].get_texts()) == n
