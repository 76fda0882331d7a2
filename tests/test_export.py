"""ONNX export and the onnxruntime model (issue #16): the graphs match PyTorch, a seeded
prediction through onnxruntime matches the PyTorch one with the same seed, the CLI writes the
same files, and bad input ends in one line.

Tolerances (float32 on the CPU): features and one step's decoder output within 1e-4 of
PyTorch relative to their scale (measured about 2e-6 and 1e-6); whole seeded predictions:
masks agree on >= 99.9% of pixels, probabilities within 1e-4."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import densediff  # noqa: E402
from densediff.cli.main import main  # noqa: E402
from densediff.deploy import export, load_onnx_model  # noqa: E402
from densediff.errors import UserError  # noqa: E402
from densediff.tasks import (
    build_model,  # noqa: E402
    class_info,
    load_config,
)
from densediff.testing import tiny  # noqa: E402
from densediff.testing.assertions import one_line_error  # noqa: E402
from densediff.testing.tiny import DDP_HEAD as DDP_TINY  # noqa: E402
from densediff.utils.checkpoint import load_metadata, save_checkpoint  # noqa: E402

TINY = tiny.TINY["generated/baseline.yaml"]
DEPTH_TINY = tiny.TINY["generated/depth_ddp.yaml"]

REL_TOL = 1e-4
"""Graph outputs: max abs difference to PyTorch over the output's largest magnitude (>= 1)."""
MASK_AGREEMENT = 0.999
PROB_TOL = 1e-4


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


def random_checkpoint(path, config: str, overrides: list[str]):
    """A checkpoint with seeded random weights (export does not care whether it was trained)."""
    cfg = load_config(config, overrides)
    names, _ = class_info(cfg)
    torch.manual_seed(0)
    save_checkpoint(path, build_model(cfg, len(names)).state_dict(), cfg, {"iteration": 0})
    return path


@pytest.fixture
def ddp_run(tiny_ddp_run):
    """The session's tiny DDP run (conftest), read-only."""
    return tiny_ddp_run


@pytest.fixture(scope="module")
def seg(tiny_ddp_run, tmp_path_factory):
    """The trained tiny DDP, exported at its default size (the 32 x 32 training crop)."""
    ckpt = tiny_ddp_run / "checkpoints/best.safetensors"
    folder = tmp_path_factory.mktemp("export") / "ddp"
    meta = export(ckpt, folder)
    return ckpt, folder, meta


def test_deploy_json_describes_the_graphs(seg):
    ckpt, folder, meta = seg
    on_disk = json.loads((folder / "deploy.json").read_text())
    assert on_disk == meta
    assert (meta["format"], meta["format_version"], meta["kind"]) == ("densediff-onnx", 1, "ddp")
    assert meta["config"] == load_metadata(ckpt)["config"]  # the stored config, unchanged
    assert meta["input_size"] == [32, 32] and meta["feature_grid"] == [8, 8]
    assert meta["map_channels"] == 16 and meta["feature_channels"] == 16
    assert meta["sampler"] == {"schedule": "cosine", "steps": 3, "td": 1.0, "sampler": "ddim",
                               "randsteps": 1, "accumulation": False, "sample_start": 1.0,
                               "self_condition": False, "time_input": "log_snr",
                               "precondition": False}
    assert meta["output_kind"] == "classes"
    assert meta["inputs"] == {"encoder": ["image"], "step": ["features", "x_t", "log_snr"]}
    assert sorted(p.name for p in folder.iterdir()) == ["deploy.json", "encoder.onnx",
                                                        "step.onnx"]
    assert max(meta["check"].values()) < 1e-4, meta["check"]


def test_runtime_is_a_dense_model_sampling_with_the_exported_settings(seg, tmp_path):
    """The onnxruntime model satisfies the model interface, samples with the settings
    deploy.json records (not the stored config's), and reads exports that predate the
    output_kind and inputs entries."""
    from densediff.models.interface import DenseModel, Trajectory

    _, folder, meta = seg
    rt = load_onnx_model(folder)
    assert isinstance(rt, DenseModel) and rt.output_kind == "classes"
    assert (rt.default_steps, rt.min_steps, rt.max_steps, rt.accumulation) == (3, 1, None, False)
    img = torch.randn(1, 3, 32, 32)
    traj = rt.sample_steps(rt.extract(img), 2, seeds=[3])
    assert isinstance(traj, Trajectory) and len(traj.steps) == 2
    assert torch.equal(rt.predict_map(img, 2, seeds=[3]),
                       torch.nn.functional.interpolate(traj.output(False), size=(32, 32),
                                                       mode="bilinear", align_corners=False))
    changed = tmp_path / "changed"
    shutil.copytree(folder, changed)
    old = {k: v for k, v in meta.items() if k not in ("output_kind", "inputs")}
    sampler = {**meta["sampler"], "steps": 2, "randsteps": 2, "sampler": "ddpm"}
    (changed / "deploy.json").write_text(json.dumps({**old, "sampler": sampler}))
    rt2 = load_onnx_model(changed)
    assert rt2.output_kind == "classes" and rt2.step.inputs == meta["inputs"]["step"]
    assert rt2.default_steps == 2 and rt2.diffusion_cfg.sampler == "ddpm"
    assert rt2.sample_steps(rt2.extract(img), 2).steps[0].shape == (1, 2, 6, 8, 8)


def test_encoder_and_step_match_pytorch_at_batch_1_and_2(seg):
    from densediff.api import load_model

    ckpt, folder, _ = seg
    model = load_model(ckpt)[0].eval()
    rt = load_onnx_model(folder)
    gen = torch.Generator().manual_seed(1)
    for b in (1, 2):
        img = torch.randn(b, 3, 32, 32, generator=gen)
        with torch.no_grad():
            feat = model.extract(img)
            x_t = torch.randn(b, 16, 8, 8, generator=gen)
            log_snr = model.schedule(torch.rand(b, generator=gen))
            logits = model.denoise(feat, x_t, log_snr)
        feat_rt = rt.extract(img)
        logits_rt, x0_rt = rt.denoise_step(feat, x_t, log_snr)
        assert feat_rt.shape == feat.shape and logits_rt.shape == logits.shape == (b, 6, 8, 8)
        assert rel_diff(feat_rt, feat) < REL_TOL, rel_diff(feat_rt, feat)
        assert rel_diff(logits_rt, logits) < REL_TOL, rel_diff(logits_rt, logits)
        same = logits_rt.argmax(1) == logits.argmax(1)
        assert same.float().mean() >= MASK_AGREEMENT
        x0 = model.encode_prediction(logits)
        torch.testing.assert_close(x0_rt * same[:, None], x0 * same[:, None], atol=1e-6, rtol=0)
    # batch 2 sampling: each image's noise comes from its own seed, as in PyTorch
    img = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        want = model.sample_steps(model.extract(img), 3, seeds=[7, 8]).step_outputs()
    both = rt.sample_steps(rt.extract(img), 3, seeds=[7, 8]).step_outputs()
    second = rt.sample_steps(rt.extract(img[1:]), 3, seeds=[8]).step_outputs()
    assert both.shape == want.shape == (3, 2, 6, 8, 8)
    assert (both.argmax(2) == want.argmax(2)).float().mean() >= MASK_AGREEMENT
    assert rel_diff(both, want) < REL_TOL
    torch.testing.assert_close(second[:, 0], both[:, 1], atol=1e-5, rtol=0)


def test_load_onnx_threads_and_providers_reach_every_session(seg, capsys):
    """``load_onnx(threads=, providers=)`` configures both graphs' onnxruntime sessions (the
    default: torch's thread count, the CPU provider), and predictions do not change with them.
    (An unknown provider is onnxruntime's business: it warns and falls back to the CPU.)"""
    ckpt, folder, _ = seg
    default = densediff.load_onnx(folder)
    tuned = densediff.load_onnx(folder, threads=2, providers=["CPUExecutionProvider"])
    for predictor, threads in ((default, torch.get_num_threads()), (tuned, 2)):
        sessions = [predictor.model.encoder.sess, predictor.model.step.sess]
        for sess in sessions:
            assert sess.get_session_options().intra_op_num_threads == threads
            assert sess.get_providers() == ["CPUExecutionProvider"]
    img = np.random.default_rng(3).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    a, b = default.predict(img, steps=2, seed=4), tuned.predict(img, steps=2, seed=4)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-6, rtol=0)


def test_seeded_prediction_matches_pytorch(seg, capsys):
    ckpt, folder, _ = seg
    pt, ox = densediff.load(ckpt), densediff.load_onnx(folder)
    assert ox.is_diffusion and ox.class_names == pt.class_names
    np.testing.assert_array_equal(ox.palette, pt.palette)
    rng = np.random.default_rng(2)
    img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    for steps, seed in ((1, 0), (3, 5), (5, 11)):
        a, b = pt.predict(img, steps=steps, seed=seed), ox.predict(img, steps=steps, seed=seed)
        assert b.steps == steps and b.trajectory.shape == (steps, 32, 32)
        assert (a.mask == b.mask).mean() >= MASK_AGREEMENT
        assert (a.trajectory == b.trajectory).mean() >= MASK_AGREEMENT
        np.testing.assert_allclose(b.probs, a.probs, atol=PROB_TOL, rtol=0)
        np.testing.assert_allclose(b.uncertainty, a.uncertainty, atol=1e-3)
    # a batch on onnxruntime: each image's results are its results alone (measured bit for
    # bit here; onnxruntime's kernels are not patched per image as PyTorch's are)
    imgs = [img, rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), img]
    many = ox.predict(imgs, steps=2, seed=[3, 4, 5], batch_size=3)
    for im, s, m in zip(imgs, (3, 4, 5), many):
        one = ox.predict(im, steps=2, seed=s)
        np.testing.assert_array_equal(m.probs, one.probs)
        np.testing.assert_array_equal(m.uncertainty, one.uncertainty)
    assert "resized" not in capsys.readouterr().err
    # another size: resized to the exported 32 x 32 (one note), outputs at the image's size
    other = rng.integers(0, 255, (30, 41, 3), dtype=np.uint8)
    c, d = ox.predict(other, steps=2), ox.predict(other, steps=2)
    assert c.mask.shape == (30, 41) and c.probs.shape == (6, 30, 41)
    np.testing.assert_array_equal(c.probs, d.probs)
    err = capsys.readouterr().err
    assert err.count("note: 30x41 input resized to the exported 32x32") == 1, err


def test_cli_export_then_predict_writes_the_torch_files(ddp_run, tmp_path, capsys):  # noqa: F811
    ckpt = str(ddp_run / "checkpoints/best.safetensors")
    out = tmp_path / "exp"
    assert main(["export", ckpt, "--out", str(out), "--size", "32", "32"]) == 0
    text = capsys.readouterr().out
    assert "encoder.onnx, step.onnx, deploy.json" in text and "input 32x32" in text, text
    src = tmp_path / "imgs"
    src.mkdir()
    rng = np.random.default_rng(3)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(src / f"{name}.png")
    opts = ["--steps", "3", "--seed", "4", "--uncertainty", "--trajectory", "--save-probs"]
    assert main(["predict", ckpt, str(src), "--out", str(tmp_path / "t"), *opts]) == 0
    assert main(["predict", str(out), str(src), "--out", str(tmp_path / "o"), *opts,
                 "--runtime", "onnx"]) == 0
    torch_files = sorted(p.name for p in (tmp_path / "t").iterdir())
    assert len(torch_files) == 2 * 7  # mask color overlay entropy uncertainty trajectory probs
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == torch_files
    for name in ("a", "b"):
        m_t = np.asarray(Image.open(tmp_path / "t" / f"{name}_mask.png"))
        m_o = np.asarray(Image.open(tmp_path / "o" / f"{name}_mask.png"))
        assert (m_t == m_o).mean() >= MASK_AGREEMENT
    # never overwrite: a second export into the now non-empty folder, unless --overwrite
    one_line_error(capsys, main(["export", ckpt, "--out", str(out)]), str(out), "--overwrite")
    assert main(["export", ckpt, "--out", str(out), "--overwrite"]) == 0
    one_line_error(capsys, main(["predict", str(out), str(src), "--out", str(tmp_path / "p"),
                                 "--runtime", "onnx", "--device", "cuda"]), "--device", "CPU")
    one_line_error(capsys, main(["predict", str(out), str(src), "--out", str(tmp_path / "p"),
                                 "--runtime", "onnx", "--aug-test"]), "--aug-test", "multi-scale")


@pytest.mark.parametrize("case", ["depth_ddp", "depth_twin", "twin", "ddp_levers"])
def test_depth_discriminative_and_sampler_options(case, tmp_path):
    config, overrides = {
        "depth_ddp": ("configs/generated/depth_ddp.yaml", DEPTH_TINY),
        "depth_twin": ("configs/generated/depth_twin.yaml", DEPTH_TINY),
        "twin": ("configs/generated/baseline.yaml",
                 [*TINY, "model.head.type=deformable", "model.head.num_layers=1",
                  "model.head.num_heads=4", "model.head.ffn_channels=32"]),
        # self-conditioning (a 4th step input), 2 starts, the ancestral sampler's seeded
        # noise, preconditioning, accumulated probabilities
        "ddp_levers": ("configs/generated/ddp.yaml",
                       [*TINY, *DDP_TINY, "model.diffusion.self_condition=true",
                        "model.diffusion.randsteps=2", "model.diffusion.sampler=ddpm",
                        "model.diffusion.precondition=true",
                        "model.diffusion.accumulation=true"]),
    }[case]
    ckpt = random_checkpoint(tmp_path / "m.safetensors", config, overrides)
    meta = export(ckpt, tmp_path / "exp")
    pt, ox = densediff.load(ckpt), densediff.load_onnx(tmp_path / "exp")
    h, w = meta["input_size"]
    img = np.random.default_rng(4).integers(0, 255, (h, w, 3), dtype=np.uint8)
    kw = {"steps": 3, "seed": 9} if meta["kind"] == "ddp" else {}
    a, b = pt.predict(img, **kw), ox.predict(img, **kw)
    if case.startswith("depth"):
        assert (h, w) == (32, 48) and b.depth.shape == (32, 48)
        np.testing.assert_allclose(b.depth, a.depth, rtol=REL_TOL, atol=1e-5)
        if case == "depth_ddp":
            np.testing.assert_allclose(b.trajectory, a.trajectory, rtol=REL_TOL, atol=1e-5)
            np.testing.assert_allclose(b.uncertainty, a.uncertainty, atol=1e-4)
    else:
        assert (a.mask == b.mask).mean() >= MASK_AGREEMENT
        np.testing.assert_allclose(b.probs, a.probs, atol=PROB_TOL, rtol=0)
    if case == "ddp_levers":
        assert meta["sampler"]["self_condition"] and meta["sampler"]["randsteps"] == 2
        np.testing.assert_array_equal(b.trajectory, a.trajectory)
    if meta["kind"] == "discriminative":
        assert set(meta["graphs"]) == {"encoder", "head"} and not ox.is_diffusion


def test_bad_export_folders_are_one_line_errors(seg, tmp_path, capsys):
    _, folder, meta = seg

    def broken(name, change):
        bad = tmp_path / name
        shutil.copytree(folder, bad)
        change(bad)
        return bad

    def meta_with(**kw):
        return lambda d: (d / "deploy.json").write_text(
            json.dumps({**json.loads((folder / "deploy.json").read_text()), **kw}))

    cases = [
        (tmp_path / "nothing", "no such folder"),
        (broken("nojson", lambda d: (d / "deploy.json").unlink()), "deploy.json: missing"),
        (broken("corrupt", lambda d: (d / "deploy.json").write_text("{not json")),
         "not readable JSON"),
        (broken("version", meta_with(format_version=99)), "format_version 99 is not supported"),
        (broken("format", meta_with(format="other")), "not a densediff export"),
        (broken("kind", meta_with(kind="ddps")), "unknown kind 'ddps'"),
        (broken("outside", meta_with(graphs={"encoder": "../x.onnx", "step": "step.onnx"})),
         "'graphs' must name"),
        (broken("size", meta_with(input_size=[32])), "'input_size' must be"),
        (broken("nosampler", meta_with(sampler={"steps": 3})), "'sampler.schedule' is missing"),
        (broken("badsampler", meta_with(sampler={**meta["sampler"], "sampler": "euler"})),
         "'sampler.sampler': Input should be 'ddim' or 'ddpm'"),
        (broken("selfcond", meta_with(sampler={**meta["sampler"], "self_condition": True})),
         "'sampler.self_condition' is True, but the step graph has no x0_prev"),
        (broken("kindout", meta_with(output_kind="mask")), "'output_kind' must be one of"),
        (broken("inputs", meta_with(inputs={"encoder": ["image"], "step": ["x_t"]})),
         r"'inputs.step' must be \['features', 'x_t'\]"),
        (broken("nostep", lambda d: (d / "step.onnx").unlink()), "step.onnx: missing"),
        (broken("badgraph", lambda d: (d / "step.onnx").write_bytes(b"garbage")),
         "onnxruntime cannot load it"),
    ]
    for path, needle in cases:
        with pytest.raises(UserError, match=needle) as e:
            densediff.load_onnx(path)
        assert "\n" not in str(e.value) and (path.name in str(e.value))
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    one_line_error(capsys, main(["predict", str(tmp_path / "version"), str(img), "--out",
                                 str(tmp_path / "p"), "--runtime", "onnx"]), "format_version")


def test_missing_onnx_packages_name_the_extra(seg, tmp_path, monkeypatch):
    ckpt, folder, _ = seg
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    with pytest.raises(UserError, match=r'pip install "densediff\[onnx\]"'):
        densediff.load_onnx(folder)
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(UserError, match=r'export needs the onnx package: pip install'):
        export(ckpt, tmp_path / "e")
    assert not (tmp_path / "e").exists()  # refused before anything was written


def test_export_refuses_bev_ddps_and_bad_options(seg, tmp_path, capsys):
    ckpt = str(seg[0])
    for config, needle in (("configs/generated/bev_ddp.yaml", "a BEV model cannot be exported"),
                           ("configs/generated/ddps.yaml", "a DDPS model cannot be exported")):
        path = tmp_path / f"{needle.split()[1]}.safetensors"
        save_checkpoint(path, {"w": torch.zeros(1)}, load_config(config, []))
        err = one_line_error(capsys, main(["export", str(path), "--out", str(tmp_path / "x")]),
                             needle, str(path))
        assert "segmentation and depth models" in err  # says what is supported
    not_ckpt = tmp_path / "not.safetensors"
    not_ckpt.write_bytes(b"nonsense")
    one_line_error(capsys, main(["export", str(not_ckpt), "--out", str(tmp_path / "y")]),
                   str(not_ckpt))
    for opset in ("13", "99"):
        one_line_error(capsys, main(["export", ckpt, "--out", str(tmp_path / "z"), "--opset",
                                     opset]), "--opset", opset)
    one_line_error(capsys, main(["export", ckpt, "--out", str(tmp_path / "z"), "--size", "16",
                                 "16"]), "--size")
    file_out = tmp_path / "file"
    file_out.write_text("x")
    one_line_error(capsys, main(["export", ckpt, "--out", str(file_out)]), str(file_out))


def test_int8_export_quantizes_the_linear_layers_and_still_predicts(seg, tmp_path, capsys):
    """``export --quantize int8``: the graphs' MatMuls become int8 (dynamic quantisation),
    deploy.json says so, the runtime reads it and its seeded masks stay close to fp32's."""
    import onnx

    ckpt, folder, _ = seg
    out = tmp_path / "int8"
    assert main(["export", str(ckpt), "--out", str(out), "--quantize", "int8"]) == 0
    assert "int8 linear layers" in capsys.readouterr().out
    meta = json.loads((out / "deploy.json").read_text())
    assert meta["quantize"] == "int8" and meta["inputs"]["step"] == ["features", "x_t", "log_snr"]
    ops = {n.op_type for n in onnx.load(str(out / "step.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} & ops, ops
    fp32, q8 = densediff.load_onnx(folder), densediff.load_onnx(out)
    img = np.random.default_rng(4).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    a, b = fp32.predict(img, steps=3, seed=1), q8.predict(img, steps=3, seed=1)
    assert (a.mask == b.mask).mean() >= 0.9  # int8 moves a few pixels, not the picture
    with pytest.raises(SystemExit):
        main(["export", str(ckpt), "--out", str(tmp_path / "q"), "--quantize", "int4"])
    with pytest.raises(UserError, match="--quantize: expected int8"):
        export(ckpt, tmp_path / "q2", quantize="fp16")
