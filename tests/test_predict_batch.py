"""Batched, recursive and video prediction (issue #25): ``Predictor.predict`` on a list,
``predict --batch-size`` (per-image noise: the batch-1 results), folders with ``--recursive``
and globs (output names mirror the tree, never collide), videos and frame folders."""

import numpy as np
import pytest
import torch
from PIL import Image

from densediff.api import Predictor
from densediff.cli.main import main
from densediff.errors import UserError
from densediff.tasks import build_model, class_info, load_config
from densediff.testing.assertions import one_line_error
from densediff.testing.tiny import DDP_HEAD, TINY


def _predictor(config, *extra):
    torch.manual_seed(0)
    cfg = load_config(f"configs/{config}", [*TINY.get(config, TINY["generated/baseline.yaml"]),
                                            *extra])
    names, palette = class_info(cfg)
    return Predictor(build_model(cfg, len(names)), cfg, names, palette)


def _images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in sizes]


@pytest.mark.parametrize("config,extra,keys", [
    ("generated/ddp.yaml", DDP_HEAD, ("mask", "trajectory", "probs", "uncertainty", "entropy")),
    ("generated/ddp.yaml", [*DDP_HEAD, "model.diffusion.randsteps=2"], ("probs", "uncertainty")),
    ("generated/depth_ddp.yaml", (), ("depth", "trajectory")),
])
def test_predict_list_is_bit_identical_to_one_at_a_time(config, extra, keys, monkeypatch):
    pred = _predictor(config, *extra)
    images = _images([(32, 32), (32, 32), (24, 40), (32, 32)])
    one = [pred.predict(im, steps=2, seed=7) for im in images]
    calls = []
    extract = pred.model.extract
    monkeypatch.setattr(pred.model, "extract", lambda x: calls.append(len(x)) or extract(x))
    many = pred.predict(images, steps=2, seed=7, batch_size=4)
    assert isinstance(many, list) and len(many) == 4
    assert sorted(calls) == [1, 3]  # the three 32 x 32 images in one batch, 24 x 40 alone
    for a, b in zip(one, many):
        for k in keys:
            assert np.array_equal(getattr(a, k), getattr(b, k)), k  # bit for bit
    # another seed per image changes exactly that image
    other = pred.predict(images[:2], steps=2, seed=[7, 8])
    key = next(k for k in keys if np.asarray(getattr(one[0], k)).dtype.kind == "f")
    assert np.array_equal(getattr(other[0], key), getattr(one[0], key))
    assert not np.array_equal(getattr(other[1], key), getattr(one[1], key))
    with pytest.raises(UserError, match="seed: 3 seeds for 2 inputs"):
        pred.predict(images[:2], seed=[1, 2, 3])
    with pytest.raises(UserError, match="batch_size"):
        pred.predict(images[:2], batch_size=0)


@pytest.fixture
def ckpt(tiny_ddp_run):
    return str(tiny_ddp_run / "checkpoints" / "best.safetensors")


def _tree(root):
    """in/a.png, in/a.jpg (one stem), in/sub/b.png, in/sub/deeper/c.png."""
    for rel, v in (("a.png", 10), ("a.jpg", 200), ("sub/b.png", 90), ("sub/deeper/c.png", 50)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((32, 32, 3), v, np.uint8)).save(root / rel)
    return root


def _masks(out):
    return {p.relative_to(out).as_posix(): np.asarray(Image.open(p))
            for p in sorted(out.rglob("*_mask.png"))}


def test_batch_size_recursive_mirrors_the_tree_and_matches_batch_1(ckpt, tmp_path):
    inp = _tree(tmp_path / "in")
    assert main(["predict", ckpt, str(inp), "--out", str(tmp_path / "o1"), "--recursive",
                 "--quiet", "--steps", "2"]) == 0
    # the output folder inside the input tree is not read back as input
    out = inp / "preds"
    assert main(["predict", ckpt, str(inp), "--out", str(out), "--recursive", "--quiet",
                 "--steps", "2", "--batch-size", "3"]) == 0
    one, batched = _masks(tmp_path / "o1"), _masks(out)
    assert sorted(one) == ["a_jpg_mask.png", "a_png_mask.png", "sub/b_mask.png",
                           "sub/deeper/c_mask.png"]
    assert sorted(batched) == sorted(one)
    assert all(np.array_equal(one[k], batched[k]) for k in one)
    # without --recursive: the folder's own images only
    assert main(["predict", ckpt, str(inp), "--out", str(tmp_path / "o2"), "--quiet"]) == 0
    assert sorted(_masks(tmp_path / "o2")) == ["a_jpg_mask.png", "a_png_mask.png"]


def test_globs_and_several_inputs(ckpt, tmp_path, capsys):
    inp = _tree(tmp_path / "in")
    out = tmp_path / "o"
    assert main(["predict", ckpt, str(inp / "**" / "*.png"), str(inp / "a.jpg"), "--out",
                 str(out), "--quiet"]) == 0
    # the glob mirrors below its fixed folder; a.png and a.jpg in one output folder: no clash
    assert sorted(_masks(out)) == ["a_jpg_mask.png", "a_png_mask.png", "sub/b_mask.png",
                                   "sub/deeper/c_mask.png"]
    code = main(["predict", ckpt, str(inp / "*.tif"), "--out", str(out)])
    one_line_error(capsys, code, "*.tif", "no image or video files")


def _write_video(path, frames, fps=5):
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def _frames_of(path):
    from densediff.data.video import read_frames

    return list(read_frames(path))


def test_video_in_video_out(ckpt, tmp_path, capsys):
    frames = [np.full((32, 32, 3), 40 * i, np.uint8) for i in range(4)]
    for i, f in enumerate(frames):
        f[8:20, 4 + 4 * i:16 + 4 * i] = (250, 30, 30)
    video = _write_video(tmp_path / "clip.mp4", frames)
    out = tmp_path / "o"
    assert main(["predict", ckpt, str(video), "--out", str(out), "--batch-size", "3",
                 "--steps", "2"]) == 0
    assert "(4 frames)" in capsys.readouterr().out
    written = _frames_of(out / "clip_overlay.mp4")
    assert len(written) == 4 and written[0].shape == (32, 32, 3)
    masks = sorted((out / "clip_frames").glob("*_mask.png"))
    assert [m.name for m in masks] == [f"{i:06d}_mask.png" for i in range(4)]
    # each frame's mask is the prediction of that decoded frame
    from densediff.api import load

    pred = load(ckpt)
    decoded = _frames_of(video)
    for m, f in zip(masks, decoded):
        assert np.array_equal(np.asarray(Image.open(m)), pred.predict(f, steps=2).mask)


def test_frame_folder_as_video(ckpt, tmp_path):
    pytest.importorskip("av")
    inp = tmp_path / "frames"
    inp.mkdir()
    for i in range(3):
        Image.fromarray(np.full((30, 31, 3), 60 * i, np.uint8)).save(inp / f"{i:03d}.png")
    out = tmp_path / "o"
    assert main(["predict", ckpt, str(inp), "--out", str(out), "--video", "--fps", "4",
                 "--quiet"]) == 0
    assert len(list(out.glob("*_mask.png"))) == 3
    written = _frames_of(out / "overlay.mp4")  # odd sizes padded to even
    assert len(written) == 3 and written[0].shape == (30, 32, 3)


def test_bad_batch_video_inputs_are_one_line(ckpt, tmp_path, capsys, monkeypatch):
    inp = _tree(tmp_path / "in")
    out = str(tmp_path / "o")
    one_line_error(capsys, main(["predict", ckpt, str(inp), "--out", out, "--batch-size",
                                 "0"]), "--batch-size")
    one_line_error(capsys, main(["predict", ckpt, str(inp), "--out", out, "--fps", "5"]),
                   "--fps", "--video")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(inp / "small.png")
    one_line_error(capsys, main(["predict", ckpt, str(inp), "--out", out, "--video"]),
                   "small.png", "--video", "one size")
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    pytest.importorskip("av")
    one_line_error(capsys, main(["predict", ckpt, str(bad), "--out", out]), "broken.mp4")
    monkeypatch.setitem(__import__("sys").modules, "av", None)  # PyAV not installed
    one_line_error(capsys, main(["predict", ckpt, str(bad), "--out", out]), "PyAV",
                   "densediff[video]")
    # a video met in a folder without PyAV: skipped with a note, the images predicted
    (inp / "clip.mp4").write_bytes(b"x")
    assert main(["predict", ckpt, str(inp), "--out", out, "--quiet"]) == 0
    assert "skipping" in capsys.readouterr().err
