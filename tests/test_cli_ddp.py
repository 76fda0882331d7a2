"""The CLI and Python API with a DDP checkpoint: multi-step eval, uncertainty, trajectories,
bench, fine-tuning from a checkpoint, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import densediff
from densediff.cli.main import main
from densediff.testing import tiny
from densediff.testing.assertions import one_line_error
from densediff.testing.fixtures import write_random_image
from densediff.testing.tiny import DDP_HEAD as DDP_TINY

TINY = tiny.TINY["generated/baseline.yaml"]


@pytest.fixture
def ddp_run(tiny_ddp_run):
    """The tiny DDP run (the session's shared run, read-only)."""
    return tiny_ddp_run


def test_eval_several_step_counts_in_one_pass(ddp_run, capsys, tmp_path):
    out = tmp_path / "val.json"
    assert main(["eval", str(ddp_run / "checkpoints/best.safetensors"), "--steps", "1,2,4",
                 "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    lines = [ln for ln in text.splitlines() if ln.strip()[:1].isdigit()]
    assert [int(ln.split("|")[0]) for ln in lines] == [1, 2, 4]
    assert "AUROC-steps" in text and "AUROC-entropy" in text
    m = json.loads(out.read_text())
    assert list(m["steps"]) == ["1", "2", "4"]
    for res in m["steps"].values():
        assert 0 <= res["mIoU"] <= 100 and len(res["per_class"]) == 6
        assert set(res["uncertainty"]) == {"steps", "entropy"}
    png = tmp_path / "val_steps.png"
    assert png.is_file() and Image.open(png).size[0] > 100


def test_eval_default_steps_prints_the_class_table(ddp_run, capsys):
    assert main(["eval", str(ddp_run / "checkpoints/best.safetensors"), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "steps: 3" in text and "ring" in text


def test_predict_writes_uncertainty_and_trajectory(ddp_run, tmp_path):
    src = write_random_image(tmp_path / "imgs")
    out = tmp_path / "pred"
    assert main(["predict", str(ddp_run / "checkpoints/best.safetensors"), str(src), "--out",
                 str(out), "--steps", "4", "--uncertainty", "--trajectory"]) == 0
    assert np.asarray(Image.open(out / "a_mask.png")).shape == (30, 41)
    for kind in ("uncertainty", "entropy"):
        assert np.asarray(Image.open(out / f"a_{kind}.png")).shape == (30, 41, 3)
    picture = np.asarray(Image.open(out / "a_trajectory.png"))  # labelled grid
    assert picture.ndim == 3 and picture.shape[1] > 41 * 6


def test_api_steps_seed_and_uncertainty(ddp_run):
    model = densediff.load(ddp_run / "checkpoints/best.safetensors")
    img = np.random.default_rng(1).integers(0, 255, (28, 36, 3), dtype=np.uint8)
    a = model.predict(img, steps=5, seed=3)
    b = model.predict(img, steps=5, seed=3)
    assert a.steps == 5 and a.trajectory.shape == (5, 28, 36)
    np.testing.assert_array_equal(a.probs, b.probs)  # seeded
    assert not np.array_equal(model.predict(img, steps=5, seed=4).probs, a.probs)  # by the seed
    assert a.uncertainty.min() >= 0 and a.uncertainty.max() <= 1
    changes = (a.trajectory[1:] != a.trajectory[:-1]).sum(0) / 4
    np.testing.assert_allclose(a.uncertainty, changes, atol=1e-6)
    assert 0 <= a.entropy.min() and a.entropy.max() <= 1
    np.testing.assert_array_equal(a.mask, a.trajectory[-1])  # no accumulation: the last step
    aug = model.predict(img, aug=True, steps=2)
    assert aug.uncertainty is None and aug.entropy.shape == (28, 36)


def test_bench_reports_each_part(capsys, tmp_path):
    out = tmp_path / "b.json"
    assert main(["bench", "configs/generated/ddp.yaml", *DDP_TINY, "--size", "32", "32",
                 "--repeats", "2", "--steps", "1,3", "--batches", "1,2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "encoder" in text and "decoder step" in text and "extra-step ratio" in text
    r = json.loads(out.read_text())
    assert set(r["total"]) == {"1", "3"} and r["tokens_per_step"] == 64  # 32/4 x 32/4
    assert r["extra_step_ratio"] == pytest.approx(
        (r["total"]["3"] - r["total"]["1"]) / (2 * r["total"]["1"]))
    try:
        import onnxruntime  # noqa: F401
        expected = {"eager", "fast", "onnx"}
    except ImportError:
        expected = {"eager", "fast"}
        assert "onnx: skipped" in text
    assert set(r["variants"]) == expected and r["base_variant"] == "eager"
    for v in r["variants"].values():
        assert set(v["total"]) == {"1", "3"} and set(v["throughput"]) == {"1", "2"}
        e = v["decoder_step"]
        assert e["min"] <= e["median"] <= e["max"] and e["speedup"] > 0
        assert 0 < v["floor_fraction"]
        # counted (probe passed): a number, and the memory pass after the heap is given back
        # faults its memory in again; not counted: None, never a blind 0
        if r["counters"]["faults"]:
            assert v["step_minor_faults"] >= 0 and v["predict_minor_faults"] > 0
        else:
            assert v["step_minor_faults"] is None and v["predict_minor_faults"] is None
    assert r["cpu"] and isinstance(r["cpu_flags"], list) and "cpu: " in text
    assert r["variants"]["eager"]["decoder_step"]["speedup"] == 1.0
    assert r["variants"]["eager"]["precision"] == "fp32"
    assert r["matmul_shape"] == [256, 256, 1024] and r["step_gflop"] > 0


def test_bench_variants_run_what_they_say(capsys, monkeypatch):
    """eager samples with grid_sample, fast with the gather (spied; the one FLOP count runs
    the eager path), and bad options end in one line."""
    from densediff.decoders import msda

    calls = {"grid_sample": 0, "gather": 0}
    for name in calls:
        real = getattr(msda, f"ms_deform_attn_{name}")

        def spy(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(msda, f"ms_deform_attn_{name}", spy)
    for variant, used, unused in (("eager", "grid_sample", "gather"),
                                  ("fast", "gather", "grid_sample")):
        calls.update(grid_sample=-1 if variant == "fast" else 0, gather=0)  # the FLOP count
        precision = ["--precision", "fp32"] if variant == "fast" else []  # eager: fp32 always
        assert main(["bench", "configs/generated/ddp.yaml", *DDP_TINY, "--size", "32", "32",
                     "--repeats", "1", "--steps", "1", "--variants", variant, *precision]) == 0
        assert calls[used] > 0 and calls[unused] == 0, (variant, calls)
    capsys.readouterr()
    for bad, needle in ((["--variants", "eager,turbo"], "--variants"),
                        (["--batches", "1,x"], "--batches"), (["--batches", "0"], "--batches"),
                        (["--precision", "fp8"], "--precision")):
        one_line_error(capsys, main(["bench", "configs/generated/ddp.yaml", *DDP_TINY,
                                     "--size", "32", "32", "--repeats", "1", *bad]), needle)
    assert main(["bench", "configs/generated/baseline.yaml", "--size", "32", "32",
                 "--repeats", "1"]) == 0
    assert "extra-step" not in capsys.readouterr().out


def test_load_from_starts_a_fine_tune_from_a_run(ddp_run, tmp_path):
    from densediff.utils.checkpoint import load_weights

    work = tmp_path / "aligned"
    assert main(["train", "configs/generated/ddp.yaml", *TINY, *DDP_TINY, f"work_dir={work}",
                 f"train.load_from={ddp_run}", "model.diffusion.self_aligned=true",
                 "train.iters=1", "train.lr=1e-12", "train.warmup_iters=0"]) == 0
    before, _ = load_weights(ddp_run / "checkpoints/best.safetensors")
    after, cfg = load_weights(work / "checkpoints/last.safetensors")
    assert cfg["model"]["diffusion"]["self_aligned"] is True
    key = "decoder.conv_seg.weight"
    np.testing.assert_allclose(after[key].numpy(), before[key].numpy(), atol=1e-6)
    assert "initialised from" in (work / "train.log").read_text()


def test_bad_input_is_one_line(ddp_run, capsys, tmp_path):
    ckpt = str(ddp_run / "checkpoints/best.safetensors")
    one_line_error(capsys, main(["eval", ckpt, "--steps", "1,x"]), "--steps")
    one_line_error(capsys, main(["eval", ckpt, "--steps", "0,2"]), "--steps")
    one_line_error(capsys, main(["train", "configs/generated/ddp.yaml", *TINY, *DDP_TINY,
                                 f"work_dir={tmp_path / 'w'}",
                                 f"train.load_from={tmp_path / 'nothing'}"]), "nothing")
    one_line_error(capsys, main(["train", "configs/generated/ddp.yaml", "model.head.type=conv"]),
                   "deformable")
    one_line_error(capsys, main(["train", "configs/generated/ddp.yaml",
                                 "model.diffusion.sample_range=[0.5,0.2]"]), "sample_range")


def test_steps_options_refuse_a_discriminative_checkpoint(tiny_baseline_run, tmp_path, capsys):
    ckpt = str(tiny_baseline_run / "checkpoints/best.safetensors")
    one_line_error(capsys, main(["eval", ckpt, "--steps", "2"]), "not a diffusion model")
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(img)
    one_line_error(capsys, main(["predict", ckpt, str(img), "--out", str(tmp_path / "p"),
                                 "--trajectory"]), "not a diffusion model")


def test_eval_plot_draws_the_scores_of_each_step_count(ddp_run, capsys, tmp_path, monkeypatch):
    """``--plot PATH`` writes the metric-vs-steps curve there (a new folder is made), from the
    same scores as the JSON, instead of the default ``<out>_steps.png``."""
    import densediff.viz as viz

    drawn = []
    real = viz.plot_steps

    def spy(results, path, keys, ylabel="%", title=None):
        assert tuple(keys) == ("mIoU", "mBIoU") and ylabel == "%"  # the pipeline's plot keys
        drawn.append({n: m["mIoU"] for n, m in results.items()})  # path: maybe a temp file
        return real(results, path, keys, ylabel, title)

    monkeypatch.setattr(viz, "plot_steps", spy)
    plot, out = tmp_path / "new" / "curve.png", tmp_path / "val.json"
    assert main(["eval", str(ddp_run / "checkpoints/best.safetensors"), "--steps", "1,2",
                 "--no-controls", "--quiet", "--plot", str(plot), "--out", str(out)]) == 0
    assert f"wrote {plot}" in capsys.readouterr().out
    scores = {int(n): m["mIoU"] for n, m in json.loads(out.read_text())["steps"].items()}
    assert drawn == [scores] and list(scores) == [1, 2]
    picture = Image.open(plot)
    assert picture.format == "PNG" and picture.size == (540, 384)  # 4.5 x 3.2 in at 120 dpi
    assert np.asarray(picture.convert("L")).std() > 10  # not a blank canvas
    assert not (tmp_path / "val_steps.png").exists()  # --plot replaces the default path


def test_bench_batch_runs_every_measurement_at_that_batch(capsys, tmp_path, monkeypatch):
    """``bench --batch 3``: the model sees batches of 3 everywhere (spied), the report and the
    JSON say so, the throughput is measured at 3, and the matmul floor scales with it."""
    from densediff.models.ddp import DDP

    sizes = []
    real = DDP.extract
    monkeypatch.setattr(DDP, "extract", lambda self, x: sizes.append(x.shape[0]) or real(self, x))
    out = tmp_path / "b.json"
    assert main(["bench", "configs/generated/ddp.yaml", *DDP_TINY, "--size", "64", "64",
                 "--batch", "3", "--repeats", "1", "--steps", "1", "--variants", "eager,fast",
                 "--precision", "fp32", "--out", str(out)]) == 0
    assert "input 3x3x64x64" in capsys.readouterr().out
    assert sizes and set(sizes) == {3}
    r = json.loads(out.read_text())
    assert r["batch"] == 3 and r["tokens_per_step"] == 256  # 64/4 x 64/4 per image
    assert r["matmul_shape"][0] == 3 * 256
    for v in r["variants"].values():
        assert set(v["throughput"]) == {"3"}
