"""DDP diagnostics (issue #13): map reliance, single-call controls, step gains, fuse weights,
checked on hand-built decoders whose answer is known, then through the CLI and the API."""

from __future__ import annotations

import json

import pytest
import torch

from densediff.cli.main import main
from densediff.engine.diagnose import (
    best_control,
    diagnose,
    format_diagnosis,
    fuse_weight_sizes,
    gains_over_controls,
    is_ddp,
)
from densediff.tasks import build_dataset, build_model, class_info, load_config
from densediff.testing import tiny
from densediff.testing.tiny import DDP_HEAD as DDP_TINY

TINY = tiny.TINY["generated/baseline.yaml"]
ONEHOT = ["model.diffusion.encoding=onehot", "model.diffusion.scale=1.0",
          "data.gen_num_val=6"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = load_config("generated/ddp.yaml", [*TINY, *DDP_TINY, *ONEHOT,
                                             f"work_dir={tmp_path_factory.mktemp('d')}"])
    names, _ = class_info(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, len(names)).eval()
    return cfg, model, build_dataset(cfg, "val", train=False)


def test_a_decoder_that_copies_y_t_shows_full_reliance(setup, monkeypatch):
    cfg, model, ds = setup
    # logits = the noisy one-hot map itself: at t = 0 it is the GT's own encoding
    monkeypatch.setattr(model, "denoise", lambda feat, x_t, log_snr: 50 * x_t)
    d = diagnose(model, ds, cfg, limit=4, steps=(1, 2), progress=False)
    r0 = next(r for r in d["reliance"] if r["t"] == 0.0)
    # its own GT on the 8 x 8 feature grid, upsampled (the best a 1/4-grid map can do) vs
    # another scene's layout
    assert r0["metric_own"] > 50 and r0["metric_other"] < 25
    assert r0["rel_change"] > 0.5
    r95 = next(r for r in d["reliance"] if r["t"] == 0.95)
    assert r95["rel_change"] < r0["rel_change"]  # noise dominates at high t
    # a zero map gives no information: every pixel the same class
    zero = [c for c in d["controls"] if c["input"] == "zero"]
    assert all(c["metric"] < 20 for c in zero)


def test_a_decoder_that_ignores_y_t_shows_no_reliance(setup, monkeypatch):
    cfg, model, ds = setup
    head = torch.nn.Conv2d(model.feat_channels, len(ds.class_names), 1)
    monkeypatch.setattr(model, "denoise", lambda feat, x_t, log_snr: head(feat))
    d = diagnose(model, ds, cfg, limit=4, steps=(1, 3), progress=False)
    for r in d["reliance"]:
        assert r["rel_change"] == 0.0
        assert r["metric_own"] == r["metric_other"]
    # every control and every step count is the same single prediction: no gain anywhere
    values = {round(c["metric"], 6) for c in d["controls"]} | {
        round(s["metric"], 6) for s in d["sampler"]}
    assert len(values) == 1
    assert all(g == 0 for g in d["gains"]["over_best_control"].values())
    assert d["sampler"][1]["change_rates"] == [0.0, 0.0]


def test_a_decoder_that_reads_only_the_time_label_is_caught_by_the_controls(setup, monkeypatch):
    """The step-curve artefact of issue #13: the output improves with the time label alone.
    The sampler's later steps run at in-range labels, so 3 steps beat 1 step, but a single
    call at the best label is as good: the gain over the best control is not positive."""
    cfg, model, ds = setup
    k = len(ds.class_names)

    def denoise(feat, x_t, log_snr):
        good = (log_snr > -15).float().view(-1, 1, 1, 1)  # t = 1 is out of range
        logits = torch.zeros(feat.shape[0], k, *feat.shape[-2:])
        logits[:, 1] = 1.0  # the most common class ...
        logits[:, 0] = 2.0 * good - 1.0  # ... unless the label is "in range"
        return logits

    monkeypatch.setattr(model, "denoise", denoise)
    d = diagnose(model, ds, cfg, limit=4, steps=(1, 3), progress=False)
    gains = d["gains"]
    assert gains["over_step_1"][3] > 0  # the step curve rises ...
    assert gains["over_best_control"][3] <= 1e-9  # ... but a single call does as well
    assert d["gains"]["best_control"]["t"] != 1.0


def test_gains_and_best_control_by_hand():
    controls = [{"input": "zero", "t": 1.0, "metric": 40.0},
                {"input": "noise", "t": 0.5, "metric": 45.0}]
    g = gains_over_controls({1: 42.0, 3: 47.5}, controls, lower_is_better=False)
    assert g["best_control"]["metric"] == 45.0
    assert g["over_best_control"] == {1: -3.0, 3: 2.5}
    assert g["over_step_1"] == {1: 0.0, 3: 5.5}
    depth = gains_over_controls({1: 0.30, 3: 0.20}, controls[:1] + [
        {"input": "zero", "t": 0.5, "metric": 0.25}], lower_is_better=True)
    assert depth["best_control"]["metric"] == 0.25
    assert depth["over_best_control"][3] == pytest.approx(0.05)
    assert best_control(controls, True)["metric"] == 40.0


def test_fuse_weight_sizes_by_hand(setup):
    _, model, _ = setup
    w = model.fuse.weight.detach()
    c_map = model.map_encoding.channels
    f = fuse_weight_sizes(model)
    assert f["map_channels"] == c_map and f["feature_channels"] == w.shape[1] - c_map
    assert f["map"] == pytest.approx(float(w[:, -c_map:].pow(2).mean().sqrt()))
    assert f["init"] == pytest.approx((2 / w.shape[1]) ** 0.5)
    # freshly Kaiming-initialised: both parts near the init RMS
    assert 0.5 < f["features"] / f["init"] < 1.5


def test_is_ddp_and_the_report(setup):
    cfg, model, ds = setup
    assert is_ddp(model)
    d = diagnose(model, ds, cfg, limit=2, steps=(1, 2), progress=False)
    text = format_diagnosis(d)
    for needle in ("map reliance", "single decoder call", "gain vs best control", "fuse weights"):
        assert needle in text
    with pytest.raises(ValueError, match="at least 2 samples"):
        diagnose(model, ds, cfg, limit=1, progress=False)


@pytest.fixture
def ddp_ckpt(tiny_ddp_run):
    return tiny_ddp_run / "checkpoints" / "best.safetensors"


def test_cli_diagnose_writes_json_and_eval_reports_control_gains(ddp_ckpt, capsys, tmp_path):
    out = tmp_path / "diag.json"
    assert main(["diagnose", str(ddp_ckpt), "--limit", "3", "--steps", "1,2", "--out",
                 str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "map reliance" in text and "gain vs best control" in text
    d = json.loads(out.read_text())
    assert d["samples"] == 3 and [r["t"] for r in d["reliance"]] == [0.0, 0.25, 0.5, 0.75, 0.95]
    assert len(d["controls"]) == 10 and [s["steps"] for s in d["sampler"]] == [1, 2]
    assert main(["eval", str(ddp_ckpt), "--steps", "1,2", "--quiet", "--out",
                 str(tmp_path / "e.json")]) == 0
    text = capsys.readouterr().out
    assert "best single decoder call (control)" in text and "vs best control" in text
    e = json.loads((tmp_path / "e.json").read_text())
    assert set(e["gains"]["over_best_control"]) == {"1", "2"} and len(e["controls"]) == 10
    # the sampler's 1-step result is also a single call at t = 1 from the same noise
    one = next(c for c in e["controls"] if c["input"] == "noise" and c["t"] == 1.0)
    assert one["metric"] == pytest.approx(e["steps"]["1"]["mIoU"], abs=1e-6)
    # only the controls asked for (e.g. the best one on val), with the same values
    assert main(["eval", str(ddp_ckpt), "--steps", "1,2", "--quiet", "--controls",
                 "zero@0.95,noise@1", "--out", str(tmp_path / "e2.json")]) == 0
    e2 = json.loads((tmp_path / "e2.json").read_text())
    assert [(c["input"], c["t"]) for c in e2["controls"]] == [("zero", 0.95), ("noise", 1.0)]
    for c in e2["controls"]:
        same = next(x for x in e["controls"] if (x["input"], x["t"]) == (c["input"], c["t"]))
        assert c["metric"] == pytest.approx(same["metric"], abs=1e-9)


def test_cli_diagnose_bad_input(ddp_ckpt, capsys, tmp_path):
    from densediff.testing.assertions import one_line_error
    from densediff.testing.runs import untrained_checkpoint

    one_line_error(capsys, main(["diagnose", str(ddp_ckpt), "--limit", "1"]), "--limit")
    twin = untrained_checkpoint(tmp_path / "twin.safetensors")
    one_line_error(capsys, main(["diagnose", str(twin)]), "not a DDP model")
    one_line_error(capsys, main(["diagnose", str(ddp_ckpt), "--steps", "0"]), "--steps")
    for bad in ("zero", "ones@0.5", "zero@1.5", "noise@x", "zero@0.5,", ""):
        one_line_error(capsys, main(["eval", str(ddp_ckpt), "--controls", bad]), "--controls")


def _untrained(config: str, overrides: list[str], tmp_path):
    cfg = load_config(config, [*overrides, f"work_dir={tmp_path}"])
    names, _ = class_info(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, len(names)).eval()
    return cfg, model, build_dataset(cfg, "val", train=False)


def test_depth_diagnostics_copy_vs_ignore(tmp_path, monkeypatch):
    """Depth (AbsRel, lower is better): a decoder whose depth is the decoded noisy map reads
    the GT at t = 0 (low AbsRel) and not another scene's; one that ignores it shows none."""
    DEPTH_TINY = tiny.TINY["generated/depth_ddp.yaml"]

    cfg, model, ds = _untrained("generated/depth_ddp.yaml", DEPTH_TINY, tmp_path)
    enc = model.map_encoding
    monkeypatch.setattr(model, "denoise",
                        lambda feat, x_t, ls: enc.decode(x_t.clamp(-enc.scale, enc.scale)))
    d = diagnose(model, ds, cfg, limit=3, steps=(1, 2), progress=False)
    assert d["metric"] == "abs_rel" and d["lower_is_better"]
    r0 = d["reliance"][0]
    assert r0["metric_own"] < 0.5 * r0["metric_other"] and r0["rel_change"] > 0.05
    flat = torch.full((1,), 3.0)
    monkeypatch.setattr(model, "denoise",
                        lambda feat, x_t, ls: flat.expand(feat.shape[0], 1, *feat.shape[-2:]))
    d = diagnose(model, ds, cfg, limit=3, steps=(1, 2), progress=False)
    assert all(r["rel_change"] == 0 and r["metric_own"] == r["metric_other"]
               for r in d["reliance"])


def test_bev_diagnostics_run_on_a_bev_ddp(tmp_path):
    """BEV (mIoU over best thresholds): the full report on an untrained BEV DDP."""
    BEV_TINY = tiny.TINY["generated/bev_ddp.yaml"]

    cfg, model, ds = _untrained("generated/bev_ddp.yaml", [*BEV_TINY, "data.gen_num_val=2"],
                                tmp_path)
    d = diagnose(model, ds, cfg, limit=2, steps=(1, 2), progress=False)
    assert d["metric"] == "mIoU" and d["samples"] == 2
    assert len(d["controls"]) == 10 and len(d["sampler"][1]["change_rates"]) == 1
    assert all(0 <= r["metric_own"] <= 100 and r["rel_change"] >= 0 for r in d["reliance"])
    assert d["fuse"]["map_channels"] == model.map_encoding.channels
