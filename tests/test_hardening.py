"""Bad input and faults (issue #14): each class ends in one line naming the file/key/option,
before the expensive work where possible, and no run folder, checkpoint or output is lost."""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densediff.cli.main import main
from densediff.engine import trainer as T
from densediff.errors import ConfigError, DataError, UserError
from densediff.tasks import TASKS
from densediff.testing import tiny
from densediff.testing.assertions import one_line_error
from densediff.testing.runs import tiny_config, untrained_checkpoint
from densediff.utils.checkpoint import load_metadata, load_train_state


def _png(path: Path, h: int = 40, w: int = 40) -> Path:
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(path)
    return path


def _bomb_png(path: Path, width: int, height: int) -> Path:
    """A valid greyscale PNG of ``width`` x ``height`` zeros: a few kB on disk, width x height
    bytes once decoded (written by hand, so the test never holds the decoded image)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    comp = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    data = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


# ---------------------------------------------------------------------------------------------
# images: decoded-pixel limit, folders named like images, link loops


def test_decoded_pixel_limit_refuses_from_the_header(tmp_path, monkeypatch):
    from densediff.data.io import image_size, read_image

    bomb = _bomb_png(tmp_path / "bomb.png", 12000, 6000)  # 72 M pixels, under Pillow's limit
    assert bomb.stat().st_size < 200_000
    with pytest.raises(DataError, match=r"bomb.png: 12000x6000 = 72.0 M pixels.*"
                                         r"DENSEDIFF_MAX_IMAGE_PIXELS"):
        read_image(bomb)
    with pytest.raises(DataError, match="above the limit"):
        image_size(bomb)  # refused from the header alone
    monkeypatch.setenv("DENSEDIFF_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(DataError, match="above the limit of 0.001 M"):
        read_image(_png(tmp_path / "small.png"))
    monkeypatch.setenv("DENSEDIFF_MAX_IMAGE_PIXELS", "100000000")  # raised: the file is trusted
    assert image_size(bomb) == (6000, 12000)
    monkeypatch.setenv("DENSEDIFF_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(DataError, match="DENSEDIFF_MAX_IMAGE_PIXELS='lots'"):
        read_image(tmp_path / "small.png")


def test_predict_refuses_a_bomb_before_predicting_anything(capsys, tmp_path):
    ckpt = untrained_checkpoint(tmp_path / "ck.safetensors")
    inp = tmp_path / "in"
    inp.mkdir()
    _png(inp / "a.png")
    _bomb_png(inp / "b.png", 12000, 6000)
    one_line_error(capsys, main(["predict", str(ckpt), str(inp), "--out", str(tmp_path / "o")]),
                   "b.png", "M pixels")
    assert not list((tmp_path / "o").glob("a_*"))  # checked before the first prediction


def test_predict_skips_folders_named_like_images_and_link_loops(capsys, tmp_path):
    ckpt = untrained_checkpoint(tmp_path / "ck.safetensors")
    inp = tmp_path / "in"
    inp.mkdir()
    _png(inp / "a.png")
    (inp / "x.png").mkdir()  # a folder with an image suffix
    os.symlink("loop.png", inp / "loop.png")  # a link to itself
    os.symlink("other.jpg", inp / "l2.jpg")
    os.symlink("l2.jpg", inp / "other.jpg")  # a two-link loop
    os.symlink("..", inp / "up")  # a loop through the parent: iterdir is not recursive
    os.symlink("missing.png", inp / "dangling.png")
    code = main(["predict", str(ckpt), str(inp), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert (tmp_path / "o" / "a_mask.png").is_file()
    for name, kind in (("x.png", "a folder"), ("loop.png", "looping link"),
                       ("dangling.png", "broken or looping link")):
        assert f"skipping {inp / name}: " in err and kind in err, err
    assert "Traceback" not in err
    one_line_error(capsys, main(["predict", str(ckpt), str(inp / "loop.png"), "--out",
                                 str(tmp_path / "o")]), "loop.png", "looping")


def test_data_folder_with_a_link_loop_is_listed_without_hanging(tmp_path):
    from densediff.data.layouts import scan
    from densediff.testing.fixtures import write_folder

    root = write_folder(tmp_path / "ds")
    os.symlink(".", root / "images" / "again")  # would recurse forever if followed
    os.symlink("x.png", root / "images" / "x.png")  # a link to itself
    layout = scan("folder", root, "all")
    assert layout.files and not any("again" in str(img) for img, _ in layout.files)
    assert not any(img.name == "x.png" for img, _ in layout.files)


def test_config_path_that_is_a_folder(capsys, tmp_path):
    one_line_error(capsys, main(["train", str(tmp_path)]), str(tmp_path), "is a folder")


# ---------------------------------------------------------------------------------------------
# options and keys out of range


@pytest.mark.parametrize("args,needles", [
    (["bench", "generated/ddp.yaml", "--size", "0", "0"], ["--size", "at least 32"]),
    (["bench", "generated/ddp.yaml", "--size", "-5", "64"], ["--size"]),
    (["bench", "generated/ddp.yaml", "--steps", "0"], ["--steps", "at least 1"]),
    (["bench", "generated/ddp.yaml", "--steps", "100000"], ["--steps", "limit of 1000"]),
    (["bench", "generated/ddp.yaml", "--batch", "0"], ["--batch"]),
    (["bench", "generated/ddp.yaml", "--repeats", "0"], ["--repeats"]),
    (["info", "generated/ddp.yaml", "--size", "0", "10"], ["--size"]),
    (["train", "generated/ddp.yaml", "seed=18446744073709551616"], ["seed"]),
    (["train", "generated/ddp.yaml", "seed=-1"], ["seed"]),
    (["train", "generated/ddp.yaml", "data.gen_seed=99999999999999999999999"], ["gen_seed"]),
    (["train", "generated/ddp.yaml", "model.diffusion.steps=100000"], ["diffusion.steps"]),
    (["train", "generated/ddp.yaml", "data.train_pipeline.crop_size=[8,8]",
      "data.batch_size=1"], ["crop_size", "BatchNorm"]),
    (["train", "generated/ddp.yaml", "data.train_pipeline.crop_size=[32,32]",
      "data.batch_size=1"], ["crop_size", "BatchNorm"]),
])
def test_out_of_range_options_and_keys(capsys, args, needles):
    one_line_error(capsys, main(args), *needles)


def test_step_and_seed_bounds_at_eval_and_predict(capsys, tmp_path):
    ckpt = untrained_checkpoint(tmp_path / "ck.safetensors", "model.type=ddp",
                                "model.head.type=deformable")
    img = _png(tmp_path / "x.png")
    out = str(tmp_path / "o")
    one_line_error(capsys, main(["predict", str(ckpt), str(img), "--out", out, "--steps",
                                 "100000"]), "--steps", "limit of 1000")
    one_line_error(capsys, main(["predict", str(ckpt), str(img), "--out", out, "--seed",
                                 str(2**64)]), "--seed")
    one_line_error(capsys, main(["predict", str(ckpt), str(img), "--out", out, "--seed", "-3"]),
                   "--seed")
    one_line_error(capsys, main(["eval", str(ckpt), "--quiet", "--steps", "1,5000"]),
                   "--steps", "limit of 1000")
    from densediff.api import check_steps, load

    with pytest.raises(UserError, match="limit of 1000"):
        check_steps(load(ckpt).model, [1001])


def test_limits_live_in_one_torch_free_module():
    import subprocess
    import sys

    import densediff.config as config
    import densediff.limits as limits

    assert config.MAX_SAMPLING_STEPS is limits.MAX_SAMPLING_STEPS
    assert config.MAX_SEED is limits.MAX_SEED
    code = ("import sys, densediff.limits, densediff.cli.main as m; m.build_parser(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # the CLI parser and the limits import no torch


def test_long_sampling_shows_progress(monkeypatch):
    from densediff.diffusion import samplers
    from densediff.diffusion.schedules import get_schedule

    seen = []

    class Bar:
        def __init__(self, it, **kw):
            seen.append(kw["desc"])
            self.it = it

        def __iter__(self):
            return iter(self.it)

    monkeypatch.setattr(samplers, "tqdm", Bar)
    sched = get_schedule("cosine")
    x = torch.zeros(1, 2, 4, 4)
    samplers.sample_ddim(lambda x, ls, prev: (x, x), x, sched, 3)
    assert seen == []  # a few steps: no bar
    preds = []
    samplers.sample_ddim(lambda x, ls, prev: (x, x), x, sched, samplers.PROGRESS_MIN_STEPS,
                         callback=lambda s, pred: preds.append(pred))
    assert seen == [f"sampling {samplers.PROGRESS_MIN_STEPS} steps"]
    assert len(preds) == samplers.PROGRESS_MIN_STEPS


# ---------------------------------------------------------------------------------------------
# outputs that cannot be written: refused before the work


class _Reached(Exception):
    """Raised by the sentinel: the command got as far as building its model."""


@pytest.mark.parametrize("command", ["train", "predict", "eval", "eval-plot", "bench"])
def test_unwritable_outputs_are_refused_first(capsys, tmp_path, monkeypatch, command):
    """The sentinel is model building, the first expensive step of every one of these
    commands (train and bench build from the config, eval and predict load the checkpoint):
    with a writable output the same command reaches it, with an unwritable one it must not."""

    ckpt = untrained_checkpoint(tmp_path / "ck.safetensors")
    img = _png(tmp_path / "x.png")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    bad = blocker / "sub"  # below a file: no one, root included, can create it
    calls = []

    def sentinel(*a, **k):
        calls.append(1)
        raise _Reached

    for task, spec in TASKS.items():  # every model is built through the task table
        monkeypatch.setitem(TASKS, task, dataclasses.replace(spec, build_model=sentinel))

    def argv(out):
        return {"train": ["train", "generated/baseline.yaml", f"work_dir={out}"],
                "predict": ["predict", str(ckpt), str(img), "--out", str(out)],
                "eval": ["eval", str(ckpt), "--quiet", "--out", str(out / "m.json")],
                "eval-plot": ["eval", str(ckpt), "--quiet", "--plot", str(out / "p.png")],
                "bench": ["bench", "generated/ddp.yaml", "--out", str(out / "b.json")]}[command]

    with pytest.raises(_Reached):  # the sentinel can fire: a writable output gets there
        main(argv(tmp_path / "good"))
    reached = len(calls)  # loading a checkpoint builds twice: on `meta` (check_fits), then
    assert reached >= 1
    one_line_error(capsys, main(argv(bad)), "a_file is a file, not a folder")
    assert len(calls) == reached  # refused before the model was built


def test_read_only_output_folder_is_refused(capsys, tmp_path, monkeypatch):
    """A folder the process may not write in (simulated: root ignores permission bits)."""
    import densediff.utils.fs as fs

    def deny(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(fs.tempfile, "mkstemp", deny)
    one_line_error(capsys, main(["train", "generated/baseline.yaml",
                                 f"work_dir={tmp_path / 'ro'}"]), "work_dir", "Permission denied")


# ---------------------------------------------------------------------------------------------
# run folders: earlier runs, concurrent runs


def test_run_folder_with_logs_but_no_checkpoints_is_not_overwritten(capsys, tmp_path):
    wd = tmp_path / "run"
    wd.mkdir()
    (wd / "metrics.csv").write_text("iter,loss\n1,2.0\n")
    (wd / "train.log").write_text("earlier\n")
    one_line_error(capsys, main(["train", "generated/baseline.yaml", f"work_dir={wd}"]),
                   "already holds an earlier run", "metrics.csv", "--resume")
    assert (wd / "metrics.csv").read_text() == "iter,loss\n1,2.0\n"
    assert (wd / "train.log").read_text() == "earlier\n"


def _hold_lock(folder: str, ready, release) -> None:
    from densediff.utils.fs import RunLock

    with RunLock(folder):
        ready.set()
        release.wait(30)


def test_two_trainings_into_one_folder_are_prevented(tmp_path):
    wd = tmp_path / "run"
    wd.mkdir()
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(wd), ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(UserError, match=rf"is in use by another training \(process "
                                            rf"{holder.pid}\)"):
            T.train(tiny_config(wd, "train.iters=1"))
        assert not (wd / "metrics.csv").exists()
    finally:
        release.set()
        holder.join(30)
    # the lock dies with its holder (also on kill -9): the folder is usable again
    metrics = T.train(tiny_config(wd, "train.iters=1", "train.eval_interval=1"))
    assert metrics["iter"] == 1


# ---------------------------------------------------------------------------------------------
# divergence: the kept checkpoint is one whose weights gave a sound loss


def test_exploding_loss_keeps_the_last_sound_checkpoint(tmp_path, monkeypatch):
    """Losses ~1 for 4 iterations, then the weights of iteration 4 give a 1000x loss (finite),
    then NaN: checkpoints/last must be iteration 2, not the finite but diverged iteration 4."""
    cfg = tiny_config(tmp_path / "w", "train.iters=10", "train.ckpt_interval=2",
                      "train.eval_interval=100", "train.log_interval=1")
    real_step, calls = T.train_step, []

    def step(model, *args, **kwargs):
        calls.append(1)
        losses, norm = real_step(model, *args, **kwargs)
        n = len(calls)
        if n == 5:  # the first loss computed with the weights saved at iteration 4
            return {**losses, "loss": losses["loss"] * 1000}, norm
        if n == 6:
            return {**losses, "loss": torch.tensor(math.nan)}, math.nan
        return losses, norm

    monkeypatch.setattr(T, "train_step", step)
    with pytest.raises(T.DivergenceError, match=r"iteration 6: .*NaN or inf.*checkpoints/last "
                                                r"is iteration 2 \(sound"):
        T.train(cfg)
    ckpt = tmp_path / "w" / "checkpoints"
    assert load_train_state(ckpt / "last.state.pt")["iteration"] == 2
    assert load_metadata(ckpt / "last.safetensors")["iteration"] == 2
    assert not (ckpt / T.PENDING_DIR).exists()
    log = (tmp_path / "w" / "train.log").read_text()
    assert "iteration 5: loss" in log and "weights of iteration 4 look diverged" in log
    # the kept run resumes
    monkeypatch.setattr(T, "train_step", real_step)
    assert T.train(cfg, resume=True)["iter"] == 10


def test_loss_spike_rule(tmp_path):
    run = T._Run.__new__(T._Run)
    run.t = tiny_config(tmp_path).train
    run.losses = T.deque([1.0, 1.2, 0.9], maxlen=T.LOSS_HISTORY)
    assert run._loss_is_sound(5.0)[0]
    sound, why = run._loss_is_sound(20.0)
    assert not sound and "20x the median 1 of the previous 3" in why
    assert not run._loss_is_sound(math.inf)[0]
    run.t.divergence_factor = None
    assert run._loss_is_sound(1e9)[0] and not run._loss_is_sound(math.nan)[0]


# ---------------------------------------------------------------------------------------------
# BEV checkpoints and messages


@pytest.fixture(scope="module")
def bev_ckpt(tmp_path_factory):
    from densediff.tasks import build_model, class_info, load_config
    from densediff.utils.checkpoint import save_checkpoint
    BEV_TINY = tiny.TINY["generated/bev_ddp.yaml"]

    path = tmp_path_factory.mktemp("bev") / "bev.safetensors"
    cfg = load_config("generated/bev_ddp.yaml", [*BEV_TINY, f"work_dir={path.parent}"])
    names, palette = class_info(cfg)
    cfg.data.class_names = list(names)
    cfg.data.palette = [tuple(int(c) for c in rgb) for rgb in palette]
    save_checkpoint(path, build_model(cfg, len(names)).state_dict(), cfg, {"iteration": 0})
    return path


def test_bev_checkpoint_given_an_image(capsys, tmp_path, bev_ckpt):
    img = _png(tmp_path / "x.png")
    err = one_line_error(capsys, main(["predict", str(bev_ckpt), str(img), "--out",
                                       str(tmp_path / "o")]), "x.png", "BEV model", "six")
    assert "split" in err and "not an image" in err


def test_eval_aug_test_on_a_bev_checkpoint(capsys, bev_ckpt):
    one_line_error(capsys, main(["eval", str(bev_ckpt), "--quiet", "--aug-test"]),
                   "--aug-test", "BEV")


def test_pickled_state_refusal_is_our_own_one_line(capsys, tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    wd = tmp_path / "run"
    (wd / "checkpoints").mkdir(parents=True)
    with open(wd / "checkpoints" / "last.state.pt", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    err = one_line_error(capsys, main(["train", "generated/baseline.yaml", f"work_dir={wd}",
                                       "--resume"]), "last.state.pt", "refused")
    assert "\x1b" not in err and "weights_only" not in err and "trust" not in err
    assert not (tmp_path / "pwned").exists()


def test_error_lines_hold_no_terminal_control_codes():
    from densediff.cli.main import error_line

    line = error_line(UserError("bad \x1b[1mfile\x1b[0m a\x07b.png"))
    assert line == "bad file a\\x07b.png"


def test_data_error_is_a_user_error():
    assert issubclass(DataError, UserError) and issubclass(ConfigError, UserError)
