"""Bad input and faults, second round (issue #23): untrusted files validated fully, sizes
bounded before allocation, finite numbers, SIGTERM and failed writes lose nothing, links not
followed, options that do not apply refused, injective output names, BOM text files, wording."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densediff.cli.main import _output_stems, main
from densediff.errors import CheckpointError, ConfigError, DataError, UserError
from densediff.testing import tiny
from densediff.testing.assertions import one_line_error
from densediff.testing.runs import untrained_checkpoint
from densediff.testing.tiny import DDP_HEAD as DDP_TINY
from densediff.utils import checks
from densediff.utils.checkpoint import load_metadata, save_checkpoint
from densediff.utils.fs import LOCK_NAME, RunLock, atomic_write, remove_stale_temps
from densediff.utils.signals import Interrupted, critical, graceful

TINY = tiny.TINY["generated/baseline.yaml"]
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _png(path: Path, h: int = 32, w: int = 32) -> Path:
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(path)
    return path


def _rewrite_meta(src: Path, dst: Path, change) -> Path:
    """A copy of the checkpoint ``src`` whose metadata config went through ``change``."""
    from safetensors.torch import load_file, save_file

    meta = {k: (v if isinstance(v, str) else json.dumps(v))
            for k, v in load_metadata(src).items()}
    cfg = json.loads(meta["config"]) if isinstance(meta["config"], str) else meta["config"]
    change(cfg)
    meta["config"] = json.dumps(cfg)
    save_file(load_file(str(src)), str(dst), metadata=meta)
    return dst


# ---------------------------------------------------------------------------------------------
# 1. untrusted files: checkpoint config checked before any allocation, nesting depth


def test_crafted_checkpoint_config_is_refused_before_building(tmp_path, monkeypatch):
    import densediff.api as api

    ckpt = untrained_checkpoint(tmp_path / "ck.safetensors")

    def huge(cfg):
        cfg["model"]["head"]["channels"] = 8192
        cfg["model"]["neck"]["channels"] = 8192
    bad = _rewrite_meta(ckpt, tmp_path / "huge.safetensors", huge)
    devices = []
    real = api.build_model

    def spy(*a, **kw):
        devices.append(torch.empty(0).device.type)  # the default device of this build
        return real(*a, **kw)
    monkeypatch.setattr(api, "build_model", spy)
    with pytest.raises(CheckpointError, match="huge.safetensors: does not fit the model"):
        api.load(bad)
    assert devices == ["meta"]  # refused from the meta build: nothing real was allocated


def test_model_size_limit_from_the_meta_build():
    from torch import nn

    from densediff.utils.checkpoint import check_fits

    with pytest.raises(CheckpointError, match=r"x.safetensors: its config asks for a model of "
                                              r"4.0 GiB, above the limit"):
        check_fits(lambda: nn.Linear(2**15, 2**15), {}, "x.safetensors", max_bytes=2**30)


def test_deeply_nested_checkpoint_metadata_is_one_line(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "deep.safetensors"
    save_file({"w": torch.zeros(1)}, str(path),
              metadata={"format": "densediff", "config": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(CheckpointError, match="deep.safetensors: metadata entry 'config' is "
                                              "nested more than 32 levels"):
        load_metadata(path)


def test_deep_yaml_and_alias_bomb_are_config_errors(tmp_path):
    from densediff.tasks import load_config

    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000)
    with pytest.raises(ConfigError, match="deep.yaml"):
        load_config(deep)
    bomb = tmp_path / "bomb.yaml"
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    bomb.write_text("\n".join(lines))
    with pytest.raises(ConfigError, match="bomb.yaml: more than"):
        load_config(bomb)
    with pytest.raises(ConfigError, match="nested more than"):
        load_config(None, ["train.lr=" + "[" * 100 + "]" * 100])


def test_train_state_entries_are_checked_before_use(tmp_path):
    from densediff.engine.trainer import _check_train_state

    good = {"iteration": 4, "samples": 8, "optimizer": {}, "best_iter": 2, "best": 0.5,
            "rng": [{}]}
    _check_train_state(good, tmp_path / "s.pt", 10)
    for key, value, needle in (("iteration", "4", "'iteration' must be a whole number"),
                               ("samples", -1, "'samples' must be"),
                               ("optimizer", [1], "'optimizer' must be a mapping"),
                               ("rng", "x", "'rng' must be a list"),
                               ("best", "high", "'best' must be a number")):
        with pytest.raises(CheckpointError, match=needle):
            _check_train_state({**good, key: value}, tmp_path / "s.pt", 10)
    with pytest.raises(CheckpointError, match="'rng' is missing"):
        _check_train_state({k: v for k, v in good.items() if k != "rng"}, tmp_path / "s.pt", 10)


# ---------------------------------------------------------------------------------------------
# deploy.json: schema, agreement with its config and graphs


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from densediff.deploy.export import export
    from densediff.tasks import build_model, class_info, load_config

    tmp = tmp_path_factory.mktemp("deploy")
    torch.manual_seed(0)
    cfg = load_config("generated/ddp.yaml", [*TINY, *DDP_TINY, f"work_dir={tmp}"])
    names, palette = class_info(cfg)
    cfg.data.class_names = list(names)
    cfg.data.palette = [tuple(int(c) for c in rgb) for rgb in palette]
    ckpt = tmp / "ddp.safetensors"
    save_checkpoint(ckpt, build_model(cfg, len(names)).state_dict(), cfg, {"iteration": 0})
    export(ckpt, tmp / "exp")
    return ckpt, tmp / "exp"


def _broken(src: Path, dst: Path, change=None, meta_change=None) -> Path:
    import shutil

    shutil.copytree(src, dst)
    if meta_change is not None:
        meta = json.loads((dst / "deploy.json").read_text())
        meta_change(meta)
        (dst / "deploy.json").write_text(json.dumps(meta))
    if change is not None:
        change(dst)
    return dst


def test_deploy_json_schema_and_consistency(export_dir, tmp_path, capsys):
    import densediff

    _, folder = export_dir
    densediff.load_onnx(folder)  # the intact export loads

    def swap(d):
        (d / "encoder.onnx").rename(d / "tmp.onnx")
        (d / "step.onnx").rename(d / "encoder.onnx")
        (d / "tmp.onnx").rename(d / "step.onnx")

    def set_(**kw):
        return lambda m: m.update(kw)

    def drop(key):
        return lambda m: m.pop(key)

    def task_cfg(m):
        m["config"]["task"] = "depth"

    def fewer_classes(m):
        for key in ("class_names", "palette"):
            m["config"]["data"][key] = m["config"]["data"][key][:3]
        m["classes"] = m["classes"][:3]
    cases = [
        (dict(meta_change=drop("map_channels")), "the entry 'map_channels' is missing"),
        (dict(meta_change=set_(map_channels="3")), "'map_channels': expected a whole number"),
        (dict(change=swap), "encoder.onnx: its inputs are"),
        (dict(meta_change=set_(input_size=[64, 64])), "encoder.onnx: input 'image' has shape"),
        (dict(meta_change=set_(input_size=[100000, 100000])), "above the limit"),
        (dict(meta_change=set_(input_size=[True, 64])), "two whole numbers"),
        (dict(meta_change=set_(task="depth")), "'task' is depth but its config's task is"),
        (dict(meta_change=task_cfg), "deploy.json"),
        (dict(meta_change=set_(kind="discriminative")), "'graphs' must name"),
        (dict(meta_change=set_(graphs={"encoder": "encoder.onnx", "step": "encoder.onnx"})),
         "two different files"),
        (dict(meta_change=set_(classes=["a"])), "'classes' (1) differ"),
        (dict(meta_change=fewer_classes), "step.onnx: its output has shape"),
        (dict(meta_change=set_(config=[])), "'config' must be a mapping"),
        (dict(change=lambda d: (d / "deploy.json").write_text("[" * 50_000 + "]" * 50_000)),
         "nested more than 32 levels"),
        (dict(change=lambda d: (d / "deploy.json").write_bytes(
            b"\xef\xbb\xbf" + (folder / "deploy.json").read_bytes())), None),  # BOM: fine
    ]
    for i, (kw, needle) in enumerate(cases):
        bad = _broken(folder, tmp_path / f"c{i}", **kw)
        if needle is None:
            densediff.load_onnx(bad)
            continue
        with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")
                           ) as e:
            densediff.load_onnx(bad)
        assert "\n" not in str(e.value) and f"c{i}" in str(e.value)
    img = _png(tmp_path / "x.png")
    one_line_error(capsys, main(["predict", str(tmp_path / "c0"), str(img), "--out",
                                 str(tmp_path / "p"), "--runtime", "onnx"]), "map_channels")


def test_fifo_graph_is_named_not_read(export_dir, tmp_path):
    import densediff

    _, folder = export_dir
    bad = _broken(folder, tmp_path / "fifo", change=lambda d: ((d / "step.onnx").unlink(),
                                                                os.mkfifo(d / "step.onnx")))
    with pytest.raises(UserError, match=r"step.onnx: is a FIFO \(named pipe\), not an ONNX"):
        densediff.load_onnx(bad)  # would block forever if opened


# ---------------------------------------------------------------------------------------------
# 2. sizes bounded before allocation


def test_sizes_have_upper_bounds_checked_first(tmp_path, capsys):
    ckpt = untrained_checkpoint(tmp_path / "ck.safetensors")
    out = tmp_path / "e"
    one_line_error(capsys, main(["export", str(ckpt), "--out", str(out), "--size", "100000",
                                 "100000"]), "--size", "above the limit")
    assert not out.exists()  # nothing written, nothing traced
    one_line_error(capsys, main(["export", str(ckpt), "--out", str(out), "--size", "8192",
                                 "8192"]), "4096 x 4096")
    one_line_error(capsys, main(["info", "generated/baseline.yaml", "--size", "9000", "64"]),
                   "--size", "above the limit")
    one_line_error(capsys, main(["train", "generated/baseline.yaml",
                                 "data.train_pipeline.crop_size=[100000,100000]",
                                 f"work_dir={tmp_path / 'r'}"]),
                   "data.train_pipeline.crop_size", "less than or equal to 8192")
    one_line_error(capsys, main(["train", "generated/baseline.yaml", "model.head.channels=10**9",
                                 f"work_dir={tmp_path / 'r'}"]), "model.head.channels")
    one_line_error(capsys, main(["train", "generated/baseline.yaml",
                                 "model.head.channels=1000000000", f"work_dir={tmp_path / 'r'}"]),
                   "model.head.channels", "8192")
    assert not (tmp_path / "r").exists()


def test_memory_error_is_one_line(tmp_path, capsys, monkeypatch):
    import densediff.cli.main as cli

    def oom(args):
        raise MemoryError
    monkeypatch.setattr(cli, "cmd_info", oom)
    monkeypatch.setattr(cli.argparse.ArgumentParser, "parse_known_args",
                        lambda self, argv=None: (cli.argparse.Namespace(func=oom), []))
    one_line_error(capsys, main(["info", "x"]), "out of memory")

    def torch_oom(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 1000000000000 bytes.")
    monkeypatch.setattr(cli.argparse.ArgumentParser, "parse_known_args",
                        lambda self, argv=None: (cli.argparse.Namespace(func=torch_oom), []))
    one_line_error(capsys, main(["info", "x"]), "out of memory", "can't allocate")


# ---------------------------------------------------------------------------------------------
# 3. finite, in-domain numbers


@pytest.mark.parametrize("override,key", [
    ("train.lr=inf", "train.lr"), ("train.lr=.nan", "train.lr"), ("train.lr=1e999", "train.lr"),
    ("train.betas=[1.5,0.9]", "train.betas.0"), ("train.betas=[0.9,1.0]", "train.betas.1"),
    ("train.grad_clip=-inf", "train.grad_clip"), ("data.mean=[.inf,0,0]", "data.mean.0"),
    ("model.diffusion.scale=.inf", "model.diffusion.scale"),
    ("data.train_pipeline.flip_prob=1.5", "data.train_pipeline.flip_prob"),
])
def test_non_finite_and_out_of_domain_floats_are_refused(override, key, tmp_path, capsys):
    work = tmp_path / "run"
    one_line_error(capsys, main(["train", "generated/baseline.yaml", override,
                                 f"work_dir={work}"]), key)
    assert not work.exists()  # no run folder left behind


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "1e999", "lots", "2.5", "1e30"])
def test_pixel_limit_env_var_is_checked(value, monkeypatch, tmp_path):
    from densediff.data.io import read_image

    monkeypatch.setenv("DENSEDIFF_MAX_IMAGE_PIXELS", value)
    with pytest.raises(DataError, match=f"DENSEDIFF_MAX_IMAGE_PIXELS='{value}': expected a "
                                        "whole number"):
        read_image(_png(tmp_path / "a.png"))
    monkeypatch.setenv("DENSEDIFF_MAX_IMAGE_PIXELS", "5e7")  # a float spelling of a count
    assert read_image(tmp_path / "a.png").shape == (32, 32, 3)


def test_distributed_env_vars_are_checked(monkeypatch):
    from densediff.utils.distributed import init_distributed

    for var, value in (("WORLD_SIZE", "two"), ("WORLD_SIZE", "inf"), ("LOCAL_RANK", "-1"),
                       ("RANK", "1e999")):
        with monkeypatch.context() as m:
            m.setenv(var, value)
            with pytest.raises(UserError, match=f"{var}="):
                init_distributed()


# ---------------------------------------------------------------------------------------------
# 4. signals, temporary files, failed writes


def test_sigterm_and_sigint_raise_at_safe_points():
    before = signal.getsignal(signal.SIGTERM)
    with graceful():
        with pytest.raises(Interrupted) as e:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
        assert e.value.exit_code == 143
        done = []
        with pytest.raises(Interrupted):
            with critical():
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):
                    pass
                done.append(True)  # the save finished before the signal took effect
        assert done == [True]
    assert signal.getsignal(signal.SIGTERM) == before  # the earlier handler is back


def test_sigterm_during_training_keeps_the_pending_checkpoint(tmp_path, capsys, monkeypatch):
    import densediff.engine.trainer as T

    real = T.save_train_state
    calls = []

    def save_then_term(path, state):
        calls.append(path)
        os.kill(os.getpid(), signal.SIGTERM)  # arrives inside the save: deferred to its end
        real(path, state)
    monkeypatch.setattr(T, "save_train_state", save_then_term)
    work = tmp_path / "run"
    code = main(["train", "generated/baseline.yaml", *TINY, "train.iters=6",
                 f"work_dir={work}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 143 and err[-1].startswith("interrupted (SIGTERM)"), err
    assert len(calls) == 1 and ".pending" in str(calls[0])
    ck = work / "checkpoints"
    assert (ck / "last.state.pt").is_file() and (ck / "last.safetensors").is_file()
    assert not (ck / ".pending").exists()
    assert not [p for p in ck.iterdir() if ".tmp" in p.name]
    assert load_metadata(ck / "last.safetensors")["iteration"] == 2


def test_stale_temp_files_are_removed_and_nothing_else(tmp_path):
    folder = tmp_path / "checkpoints"
    (folder / ".pending").mkdir(parents=True)
    dead = 2**22 + 12345  # above the usual pid_max: no such process
    ours = [folder / f".last.safetensors.tmp{dead}", folder / f".best.safetensors.tmp{dead}"
            ".safetensors", folder / ".pending" / f".last.state.pt.tmp{dead}"]
    others = [folder / "notes.tmp1", folder / "last.safetensors", folder / ".keep",
              folder / f".x.tmp{os.getppid()}"]  # a live process's file stays
    for p in ours + others:
        p.write_text("x")
    victim = tmp_path / "victim"
    victim.write_text("keep")
    os.symlink(victim, folder / f".link.tmp{dead}")  # a link is never ours
    removed = remove_stale_temps(folder)
    assert sorted(removed) == sorted(ours)
    assert all(p.exists() for p in others) and victim.read_text() == "keep"
    assert os.path.islink(folder / f".link.tmp{dead}")


def test_interrupted_and_failed_writes_leave_no_temp_and_keep_the_old_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_text("old")

    def interrupted(tmp):
        tmp.write_text("partial")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, interrupted)

    def fails(tmp):
        tmp.write_text("partial")
        raise OSError(28, "No space left on device")
    with pytest.raises(UserError, match=r"cannot write .*out.bin: No space left on device"):
        atomic_write(target, fails)
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["out.bin"]
    victim = tmp_path / "victim"
    victim.write_text("keep")
    os.symlink(victim, tmp_path / f".out.bin.tmp{os.getpid()}.bin")  # a planted link
    with pytest.raises(UserError, match="cannot write"):
        atomic_write(target, lambda tmp: tmp.write_text("new"))
    assert victim.read_text() == "keep" and target.read_text() == "old"


_FSIZE_SCRIPT = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    from densediff.cli.main import main
    sys.exit(main(sys.argv[2:]))
""")


def _run_limited(limit: int, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", _FSIZE_SCRIPT, str(limit), *argv],
                          capture_output=True, text=True, env=env, timeout=300)


def test_file_size_limit_while_saving_a_checkpoint(tmp_path):
    script = textwrap.dedent("""
        import resource, signal, sys, torch
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        from densediff.tasks import load_config
        from densediff.utils.checkpoint import save_checkpoint
        from densediff.errors import UserError
        cfg = load_config(None, [])
        save_checkpoint(sys.argv[1], {"w": torch.zeros(10)}, cfg)  # the earlier, good one
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        try:
            save_checkpoint(sys.argv[1], {"w": torch.zeros(1_000_000)}, cfg)
        except UserError as e:
            print(type(e).__name__, e)
    """)
    path = tmp_path / "ck" / "last.safetensors"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert line.startswith("CheckpointError") and "\n" not in line, line
    assert f"cannot write {path}" in line and "ulimit -f" in line, line
    assert load_metadata(path)["format"] == "densediff"  # the earlier file is intact
    assert os.listdir(path.parent) == ["last.safetensors"]  # no temporary file left


def test_file_size_limit_while_predicting(tmp_path):
    ckpt = untrained_checkpoint(tmp_path / "ck.safetensors")
    inp = tmp_path / "in"
    inp.mkdir()
    _png(inp / "a.png", 64, 64)
    _png(inp / "b.png", 64, 64)
    out = tmp_path / "out"
    r = _run_limited(2000, "predict", str(ckpt), str(inp), "--out", str(out), "--save-probs")
    err = r.stderr.strip()
    assert r.returncode == 2 and err.startswith("error: predict: cannot write ") \
        and "\n" not in err and "Traceback" not in err, err
    assert "a_probs.npy" in err and ("File too large" in err or "written" in err), err
    written = sorted(os.listdir(out))
    assert written and not [n for n in written if ".tmp" in n]  # earlier files whole
    assert "a_probs.npy" not in written and not any(n.startswith("b_") for n in written)
    for n in written:
        assert Image.open(out / n).size == (64, 64)


def test_failed_export_write_names_the_graph(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    from densediff.deploy.export import export

    ckpt = untrained_checkpoint(tmp_path / "ck.safetensors")

    def eio(module, args, path, **kw):
        Path(path).write_bytes(b"partial")
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(torch.onnx, "export", eio)
    with pytest.raises(UserError, match=r"export: cannot write .*encoder.onnx: Input/output "
                                        r"error; earlier files are intact"):
        export(ckpt, tmp_path / "exp")
    assert os.listdir(tmp_path / "exp") == []  # no partial graph, no deploy.json


# ---------------------------------------------------------------------------------------------
# 5. the run-folder lock does not follow links


def test_lock_never_follows_a_link_or_truncates_a_foreign_file(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("do not touch")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(victim, run / LOCK_NAME)
    with pytest.raises(UserError, match="a symbolic link"):
        RunLock(run)
    assert victim.read_text() == "do not touch"
    (run / LOCK_NAME).unlink()
    os.link(victim, run / LOCK_NAME)  # a hard link to another file
    with pytest.raises(UserError, match="hard link"):
        RunLock(run)
    assert victim.read_text() == "do not touch"
    (run / LOCK_NAME).unlink()
    os.mkfifo(run / LOCK_NAME)
    with pytest.raises(UserError, match="FIFO"):
        RunLock(run)
    (run / LOCK_NAME).unlink()
    with RunLock(run) as lock:  # a plain lock file works as before
        assert (run / LOCK_NAME).read_text() == str(os.getpid())
        assert lock.path == run / LOCK_NAME


def test_train_refuses_a_linked_pending_folder(tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    ck = tmp_path / "run" / "checkpoints"
    ck.mkdir(parents=True)
    os.symlink(elsewhere, ck / ".pending")
    one_line_error(capsys, main(["train", "generated/baseline.yaml", *TINY,
                                 f"work_dir={tmp_path / 'run'}"]), ".pending", "a link")
    assert (elsewhere / "keep.txt").read_text() == "keep"


def test_train_refuses_a_linked_lock_and_leaves_its_target(tmp_path, capsys):
    victim = tmp_path / "precious.txt"
    victim.write_text("do not touch")
    work = tmp_path / "run"
    work.mkdir()
    os.symlink(victim, work / LOCK_NAME)
    one_line_error(capsys, main(["train", "generated/baseline.yaml", *TINY, f"work_dir={work}"]),
                   LOCK_NAME)
    assert victim.read_text() == "do not touch"


# ---------------------------------------------------------------------------------------------
# 6. options that do not apply are refused


def test_options_that_do_not_apply_are_refused(tmp_path, capsys):
    ckpt = str(untrained_checkpoint(tmp_path / "ck.safetensors"))  # a discriminative model
    img = str(_png(tmp_path / "a.png"))
    out = str(tmp_path / "o")
    for args, needles in (
        (["eval", ckpt, "--controls", "zero@1", "--no-controls"], ("--controls",
                                                                   "--no-controls")),
        (["eval", ckpt, "--controls", "zero@1"], ("--controls", "DDP models")),
        (["eval", ckpt, "--no-controls"], ("--no-controls", "DDP models")),
        (["eval", ckpt, "--plot", str(tmp_path / "p.png")], ("--plot", "diffusion")),
        (["predict", ckpt, img, "--out", out, "--seed", "3"], ("--seed", "not a diffusion")),
        (["predict", ckpt, img, "--out", out, "--limit", "2"], ("--limit", "BEV")),
        (["predict", ckpt, img, "--out", out, "--data-root", "x"], ("--data-root", "BEV")),
        (["predict", ckpt, img, "--out", out, "--compile"], ("--compile", "no map decoder")),
        (["predict", ckpt, img, "--out", out, "--guidance", "1"], ("--guidance", "DDPS")),
        (["predict", ckpt, img, "--out", out, "--guidance", "nan"], ("--guidance",
                                                                      "finite")),
        (["eval", ckpt, "--guidance", "inf"], ("--guidance", "finite")),
        (["predict", ckpt, img, "--out", out, "--save-probs", "--runtime", "onnx",
          "--compile"], ("--compile",)),
        (["bench", "generated/baseline.yaml", "--variants", "eager", "--precision", "bf16"],
         ("--precision", "fast and compiled")),
        (["bench", "generated/baseline.yaml", *TINY, "--steps", "2", "--variants", "eager",
          "--repeats", "1"], ("--steps", "diffusion")),
    ):
        one_line_error(capsys, main(args), *needles)
    assert not list(Path(out).glob("a_*"))


# ---------------------------------------------------------------------------------------------
# 7. injective output names


def test_output_names_never_collide(tmp_path, capsys):
    ckpt = untrained_checkpoint(tmp_path / "ck.safetensors")
    inp = tmp_path / "in"
    inp.mkdir()
    colours = {"a.png": 10, "a.jpg": 120, "a_png.png": 240, "a.png.bmp": 60}
    for name, v in colours.items():
        Image.fromarray(np.full((32, 32, 3), v, np.uint8)).save(inp / name)
    out = tmp_path / "out"
    assert main(["predict", str(ckpt), str(inp), "--out", str(out)]) == 0
    stems = _output_stems(sorted(inp.iterdir()))
    assert len(set(stems)) == 4
    assert sorted(stems) == ["a.png", "a.png_bmp", "a_jpg", "a_png_png"]
    overlays = [np.asarray(Image.open(out / f"{s}_overlay.png")) for s in stems]
    assert len(list(out.glob("*_mask.png"))) == 4  # four inputs, four results
    for i in range(4):  # each result is its own image's: none was overwritten
        for j in range(i):
            assert not np.array_equal(overlays[i], overlays[j])


# ---------------------------------------------------------------------------------------------
# 8. text files: UTF-8 with a byte-order mark


def test_classes_file_with_a_bom(tmp_path):
    from densediff.data.classes import read_classes_file

    path = tmp_path / "classes.txt"
    path.write_bytes("\ufeffroad 128 64 128\nsky\n".encode())
    names, palette = read_classes_file(path)
    assert names == ["road", "sky"] and tuple(palette[0]) == (128, 64, 128)
    path.write_bytes(b"road\n\xff\xfesky\n")
    with pytest.raises(DataError, match="classes.txt: cannot read as a UTF-8 classes file"):
        read_classes_file(path)


def test_config_with_a_bom(tmp_path):
    from densediff.tasks import load_config

    path = tmp_path / "c.yaml"
    path.write_bytes("\ufefftrain:\n  lr: 0.001\n".encode())
    assert load_config(path).train.lr == 0.001


# ---------------------------------------------------------------------------------------------
# 9. wording: options named the same way; FIFOs and devices reported as what they are


def test_precision_named_as_the_option_everywhere(tmp_path, capsys):
    ckpt = str(untrained_checkpoint(tmp_path / "ck.safetensors"))
    img = str(_png(tmp_path / "a.png"))
    for cmd in (["predict", ckpt, img, "--out", str(tmp_path / "o")], ["eval", ckpt]):
        err = one_line_error(capsys, main([*cmd, "--precision", "fp16"]), "--precision:")
        assert "fp16" in err
    for cmd in (["predict", ckpt, img, "--out", str(tmp_path / "o")], ["eval", ckpt],
                ["diagnose", ckpt], ["bench", "generated/baseline.yaml"]):
        one_line_error(capsys, main([*cmd, "--device", "tpu"]), "--device 'tpu'")


def test_fifo_and_devices_are_reported_as_what_they_are(tmp_path, capsys):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    one_line_error(capsys, main(["predict", str(fifo), str(tmp_path), "--out",
                                 str(tmp_path / "o")]), "FIFO")
    ckpt = str(untrained_checkpoint(tmp_path / "ck.safetensors"))
    img_fifo = tmp_path / "in.png"
    os.mkfifo(img_fifo)
    one_line_error(capsys, main(["predict", ckpt, str(img_fifo), "--out", str(tmp_path / "o")]),
                   "FIFO")
    cfg_fifo = tmp_path / "c.yaml"
    os.mkfifo(cfg_fifo)
    one_line_error(capsys, main(["train", str(cfg_fifo)]), "FIFO")
    os.symlink("/dev/null", tmp_path / "null.safetensors")
    one_line_error(capsys, main(["eval", str(tmp_path / "null.safetensors")]),
                   "character device")
    one_line_error(capsys, main(["eval", ckpt, "--out", "/dev/null"]), "character device")
    assert checks.path_kind(tmp_path / "nothing") == "missing"


def test_library_inputs_are_one_line_errors(tmp_path):
    import densediff

    p = densediff.load(untrained_checkpoint(tmp_path / "ck.safetensors"))
    img = np.zeros((40, 40, 3), np.uint8)
    for kwargs, needle in (
        (dict(image=img, seed=-1), "seed: must be between 0"),
        (dict(image=np.zeros((0, 0, 3), np.uint8)), "at least 1x1"),
        (dict(image=np.zeros((4, 4, 5), np.uint8)), "HxW, HxWx3 or HxWx4"),
        (dict(image=np.array([["a"]])), "must hold numbers"),
    ):
        with pytest.raises(UserError, match=needle):
            p.predict(**kwargs)
    assert p.predict(np.ones((8, 8), bool)).mask.shape == (8, 8)  # bool and grey: fine
