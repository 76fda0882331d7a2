"""End-to-end CLI and Python API, including the bad-input cases of issue #2 (§8)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import densediff
from densediff.cli.main import main
from densediff.testing import tiny
from densediff.testing.assertions import one_line_error
from densediff.testing.fixtures import write_camvid, write_folder
from densediff.testing.runs import untrained_checkpoint

TINY = tiny.TINY["generated/baseline.yaml"]


@pytest.fixture
def trained(tiny_baseline_run):
    """The tiny generated-data run trained through the CLI (the session's shared run)."""
    return tiny_baseline_run


def test_train_writes_run_folder(trained):
    assert (trained / "config.yaml").is_file()
    for name in ("best.safetensors", "last.safetensors", "last.state.pt"):
        assert (trained / "checkpoints" / name).is_file()
    assert "iter" in (trained / "metrics.csv").read_text().splitlines()[0]


def test_eval_prints_table_and_writes_json(trained, capsys, tmp_path):
    out = tmp_path / "m.json"
    assert main(["eval", str(trained / "checkpoints/best.safetensors"), "--split", "test",
                 "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "mIoU" in text and "ring" in text
    import json
    m = json.loads(out.read_text())
    assert 0 <= m["mIoU"] <= 100 and len(m["per_class"]) == 6


def test_predict_folder_and_odd_images(trained, tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 41, 3), dtype=np.uint8)).save(src / "rgb.png")
    Image.fromarray(rng.integers(0, 255, (30, 41), dtype=np.uint8)).save(src / "gray.png")
    Image.fromarray(rng.integers(0, 255, (30, 41, 4), dtype=np.uint8)).save(src / "rgba.png")
    Image.fromarray(rng.integers(0, 65535, (30, 41), dtype=np.uint16)).save(src / "deep.png")
    out = tmp_path / "pred"
    assert main(["predict", str(trained / "checkpoints/best.safetensors"), str(src),
                 "--out", str(out), "--save-probs"]) == 0
    for stem in ("rgb", "gray", "rgba", "deep"):
        mask = np.asarray(Image.open(out / f"{stem}_mask.png"))
        assert mask.shape == (30, 41) and mask.max() < 6
        assert np.asarray(Image.open(out / f"{stem}_overlay.png")).shape == (30, 41, 3)
        assert np.load(out / f"{stem}_probs.npy").shape == (6, 30, 41)


def test_python_api(trained):
    model = densediff.load(trained / "checkpoints/best.safetensors")
    img = np.random.default_rng(1).integers(0, 255, (40, 52, 3), dtype=np.uint8)
    out = model.predict(img)
    assert out.mask.shape == (40, 52) and out.probs.shape == (6, 40, 52)
    np.testing.assert_allclose(out.probs.sum(0), 1.0, atol=1e-4)
    assert (out.mask == out.probs.argmax(0)).all()
    assert model.predict(Image.fromarray(img)).mask.tolist() == out.mask.tolist()


def test_info_and_data_check(capsys, tmp_path):
    assert main(["info", "configs/generated/baseline.yaml", "--size", "64", "64"]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "FLOPs" in out and "train" in out
    root = write_camvid(tmp_path / "CamVid", n=2)
    assert main(["data", "check", str(root), "--format", "camvid"]) == 0
    # break two files: a truncated image and a label of the wrong size
    img = sorted((root / "train").glob("*.png"))[0]
    img.write_bytes(img.read_bytes()[:60])
    lab = sorted((root / "valannot").glob("*.png"))[0]
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(lab)
    capsys.readouterr()
    assert main(["data", "check", str(root), "--format", "camvid"]) == 1
    out = capsys.readouterr().out
    assert img.name in out and lab.name in out


# ---------------------------------------------------------------------------------------------
# bad input: one line naming the file/key, exit 2, no traceback


def test_unknown_config_key(capsys):
    code = main(["train", "configs/generated/baseline.yaml", "model.encoder.nmae=x"])
    one_line_error(capsys, code, "model.encoder.nmae", "unknown key")


def test_bad_config_value(capsys):
    code = main(["train", "configs/generated/baseline.yaml", "train.iters=0"])
    one_line_error(capsys, code, "train.iters")


def test_missing_and_empty_folders(capsys, tmp_path):
    code = main(["train", "configs/generated/baseline.yaml", "data.dataset=camvid",
                 f"data.root={tmp_path / 'nope'}", f"work_dir={tmp_path / 'w'}"])
    one_line_error(capsys, code, "nope")
    (tmp_path / "empty").mkdir()
    code = main(["train", "configs/generated/baseline.yaml", "data.dataset=folder",
                 "data.num_classes=3", f"data.root={tmp_path / 'empty'}",
                 f"work_dir={tmp_path / 'w2'}"])
    one_line_error(capsys, code, "empty")


def test_label_out_of_range_and_size_mismatch(capsys, tmp_path):
    root = write_folder(tmp_path / "f", n=5)
    masks = sorted((root / "masks").glob("*.png"))
    bad = np.asarray(Image.open(masks[1])).copy()
    bad[3, 3] = 77
    Image.fromarray(bad).save(masks[1])
    common = ["configs/generated/baseline.yaml", "data.dataset=folder", f"data.root={root}",
              *TINY[4:], f"work_dir={tmp_path / 'w'}"]
    one_line_error(capsys, main(["train", *common]), masks[1].name, "77")
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(masks[1])
    one_line_error(capsys, main(["train", *common, f"work_dir={tmp_path / 'w2'}"]),
                   masks[1].name)


def test_truncated_image_in_predict(trained, capsys, tmp_path):
    bad = tmp_path / "cut.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8) + 9).save(bad)
    bad.write_bytes(bad.read_bytes()[:40])
    code = main(["predict", str(trained / "checkpoints/best.safetensors"), str(bad),
                 "--out", str(tmp_path / "o")])
    one_line_error(capsys, code, "cut.png")


def test_checkpoint_that_does_not_fit(trained, capsys, tmp_path):
    ckpt = str(trained / "checkpoints/best.safetensors")
    code = main(["eval", ckpt, "model.head.channels=8", "--quiet"])
    one_line_error(capsys, code, "best.safetensors")
    # a weight removed from the file
    state = load_file(ckpt)
    from safetensors import safe_open
    with safe_open(ckpt, "pt") as f:
        meta = f.metadata()
    state.pop(sorted(state)[0])
    cut = tmp_path / "cut.safetensors"
    save_file(state, str(cut), metadata=meta)
    one_line_error(capsys, main(["eval", str(cut), "--quiet"]), "cut.safetensors")


def test_pickle_checkpoint_is_never_executed(capsys, tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    bad = tmp_path / "evil.safetensors"
    bad.write_bytes(pickle.dumps(Evil()))
    one_line_error(capsys, main(["eval", str(bad), "--quiet"]), "evil.safetensors")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    one_line_error(capsys, main(["predict", str(bad), str(tmp_path / "x.png"),
                                 "--out", str(tmp_path / "o")]),
                   "evil.safetensors")
    assert not marker.exists()


def test_existing_run_is_not_overwritten(trained, capsys):
    before = (trained / "checkpoints/best.safetensors").read_bytes()
    code = main(["train", "configs/generated/baseline.yaml", *TINY, f"work_dir={trained}"])
    one_line_error(capsys, code, "--resume")
    assert (trained / "checkpoints/best.safetensors").read_bytes() == before


def test_console_script_exit_code_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "densediff.cli.main", "train",
                        str(tmp_path / "missing.yaml")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------
# bad input without a trained run: an untrained checkpoint is enough


def test_bad_checkpoint_device_and_out_paths(capsys, tmp_path):
    ckpt = untrained_checkpoint(tmp_path / "ck.safetensors")
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    # a folder is read as a run folder: without checkpoints/ it is refused in one line
    one_line_error(capsys, main(["predict", str(tmp_path), str(img), "--out", str(tmp_path / "o")]),
                   "holds no checkpoints/best or last.safetensors")
    one_line_error(capsys, main(["predict", str(ckpt), str(img), "--out", str(img)]),
                   "x.png", "--out must be a folder")
    one_line_error(capsys, main(["predict", str(ckpt), str(img), "--out", str(tmp_path / "o"),
                                 "--device", "nonsense"]), "nonsense")
    one_line_error(capsys, main(["eval", str(ckpt), "--quiet", "--device", "cuda:99"]),
                   "cuda:99")
    one_line_error(capsys, main(["eval", str(ckpt), "--quiet", "--out", str(tmp_path)]),
                   "--out must be a JSON file path")
    assert main(["predict", str(ckpt), str(img), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "x_mask.png").is_file()


def test_bad_file_read_in_a_dataloader_worker_is_one_line(capsys, tmp_path):
    # DataLoader workers re-raise a DataError with their traceback inside the message
    ckpt = untrained_checkpoint(tmp_path / "ck.safetensors")
    root = write_folder(tmp_path / "f", n=5)
    bad = root / "images" / "extra" / "img_004.jpg"  # first sorted stem: the val split
    bad.write_bytes(bad.read_bytes()[:400])
    code = main(["eval", str(ckpt), "--quiet", "data.dataset=folder", f"data.root={root}",
                 "data.num_workers=1"])
    one_line_error(capsys, code, "img_004.jpg")


def test_checkpoint_loads_without_the_pretrained_weights_used_for_training(tmp_path):
    from safetensors.torch import save_file as save

    from densediff.config import EncoderConfig
    from densediff.encoders import build_encoder

    weights = tmp_path / "encoder.safetensors"
    save(build_encoder(EncoderConfig()).state_dict(), str(weights))
    ckpt = untrained_checkpoint(tmp_path / "ck.safetensors",
                                f"model.encoder.pretrained={weights}")
    weights.unlink()  # e.g. the checkpoint was copied to another machine
    model = densediff.load(ckpt)
    assert model.cfg.model.encoder.pretrained == str(weights)  # the stored config is kept
    stored = load_file(ckpt)  # and the weights are the checkpoint's, every one of them
    loaded = model.model.state_dict()
    assert stored.keys() <= loaded.keys()
    assert all(torch.equal(loaded[k], v) for k, v in stored.items())
    assert model.predict(np.zeros((20, 24, 3), np.uint8)).mask.shape == (20, 24)


def test_predict_same_stem_different_suffix_and_api_dtypes(trained, tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    img = np.random.default_rng(2).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(img).save(src / "a.png")
    Image.fromarray(img).save(src / "a.bmp")
    out = tmp_path / "pred"
    assert main(["predict", str(trained / "checkpoints/best.safetensors"), str(src),
                 "--out", str(out)]) == 0
    assert (out / "a_png_mask.png").is_file() and (out / "a_bmp_mask.png").is_file()
    # float [0, 1] and uint16 arrays give the same result as the uint8 image
    model = densediff.load(trained / "checkpoints/best.safetensors")
    ref = model.predict(img).mask
    assert (model.predict(img.astype(np.float32) / 255).mask == ref).all()
    assert (model.predict(img.astype(np.uint16) * 257).mask == ref).all()
