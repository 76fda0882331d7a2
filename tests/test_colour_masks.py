"""Colour-coded (RGB) masks in folder datasets: loaded through classes.txt's colours, checked
by `data check` (an unknown colour: one line naming the file, the colour, a pixel and the
count), converted once by `data convert-masks`, and trained on."""

import numpy as np
import pytest
from PIL import Image

from densediff.cli.main import main
from densediff.config import Config
from densediff.data.check import check_dataset
from densediff.data.classes import read_classes
from densediff.errors import DataError
from densediff.tasks import build_dataset
from densediff.testing import tiny
from densediff.testing.assertions import one_line_error
from densediff.testing.fixtures import write_folder


def _cfg(root) -> Config:
    cfg = Config()
    cfg.data.dataset, cfg.data.root = "folder", str(root)
    return cfg


@pytest.fixture
def pair(tmp_path):
    """The same folder dataset with class-id masks and with colour masks."""
    return (write_folder(tmp_path / "ids", n=5),
            write_folder(tmp_path / "rgb", n=5, colour_masks=True))


def _labels(root):
    ds = build_dataset(_cfg(root), "all", train=False)
    return [ds.load(i)[1] for i in range(len(ds))]


def test_colour_masks_load_as_the_class_ids(pair):
    ids, rgb = pair
    assert Image.open(next((rgb / "masks").glob("*.png"))).mode == "RGB"
    a, b = _labels(ids), _labels(rgb)
    assert len(a) == 5 and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert any((x == 255).any() for x in b) and any((x == 3).any() for x in b)
    assert check_dataset(rgb, "folder") == []


def test_unknown_colour_is_one_problem_naming_file_colour_pixel_count(pair, capsys):
    _, rgb = pair
    mask = sorted((rgb / "masks").glob("*.png"))[1]
    a = np.asarray(Image.open(mask)).copy()
    a[2, 5] = a[4, 1] = a[4, 2] = (1, 2, 3)
    Image.fromarray(a).save(mask)
    problems = check_dataset(rgb, "folder")
    assert len(problems) == 1
    assert problems[0].startswith(f"{mask}: colour (1, 2, 3) at pixel (x=5, y=2)")
    assert "(3 pixels)" in problems[0]
    assert main(["data", "check", str(rgb), "--format", "folder"]) == 1
    out, err = capsys.readouterr()
    assert out.strip() == problems[0] and "Traceback" not in err
    with pytest.raises(DataError, match=r"colour \(1, 2, 3\) at pixel"):
        _labels(rgb)


def test_classes_file_without_every_colour_or_with_a_shared_one(pair):
    _, rgb = pair
    lines = (rgb / "classes.txt").read_text().splitlines()
    (rgb / "classes.txt").write_text("\n".join([lines[0], lines[1].rsplit(" ", 3)[0],
                                                *lines[2:]]) + "\n")
    problems = check_dataset(rgb, "folder")
    assert len(problems) == 5  # one per mask, each naming its file
    assert all("masks/" in p and "need a colour for every class" in p
               and p.endswith(f"write '{lines[1].rsplit(' ', 3)[0]} R G B')") for p in problems)
    cls = rgb / "classes.txt"
    cls.write_text("a 1 2 3\nb 1 2 3\n[ignore] 0 0 0\n")
    with pytest.raises(DataError, match=r"colour \(1, 2, 3\) is given twice"):
        read_classes(cls).colour_map().map(np.zeros((1, 1, 3), np.uint8), "m.png")
    cls.write_text("a 1 2 3\n[ignore]\n")
    with pytest.raises(DataError, match=r"classes.txt:2: expected '\[ignore\] R G B'"):
        read_classes(cls)


def test_convert_masks_writes_class_ids_once(pair, tmp_path, capsys):
    ids, rgb = pair
    out = tmp_path / "converted"
    assert main(["data", "convert-masks", str(rgb), "--out", str(out), "--quiet"]) == 0
    assert "5 class-id masks" in capsys.readouterr().out
    masks = sorted((out / "masks").rglob("*.png"))
    assert len(masks) == 5 and all(Image.open(m).mode == "L" for m in masks)
    assert all(np.array_equal(x, y) for x, y in zip(_labels(ids), _labels(out)))
    assert check_dataset(out, "folder") == []
    # a second run does not write into the now non-empty folder; --out inside the dataset
    one_line_error(capsys, main(["data", "convert-masks", str(rgb), "--out", str(out)]),
                   "new or empty")
    one_line_error(capsys, main(["data", "convert-masks", str(rgb), "--out",
                                 str(rgb / "x")]), "outside the dataset")


def test_convert_masks_stops_on_an_unknown_colour_and_leaves_no_masks(pair, tmp_path, capsys):
    _, rgb = pair
    mask = sorted((rgb / "masks").glob("*.png"))[-1]
    a = np.asarray(Image.open(mask)).copy()
    a[0, 0] = (9, 9, 9)
    Image.fromarray(a).save(mask)
    out = tmp_path / "converted"
    one_line_error(capsys, main(["data", "convert-masks", str(rgb), "--out", str(out),
                                 "--quiet"]), mask.name, "(9, 9, 9)", "(x=0, y=0)", "1 pixels")
    assert not (out / "masks").exists() and not (out / ".masks.partial").exists()


def test_a_palette_dataset_trains(pair, tmp_path, capsys):
    _, rgb = pair
    code = main(["train", "configs/generated/baseline.yaml", "data.dataset=folder",
                 f"data.root={rgb}", *tiny.TINY["generated/baseline.yaml"][4:],
                 "train.iters=2", "train.eval_interval=2", f"work_dir={tmp_path / 'w'}"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "w" / "checkpoints" / "best.safetensors").is_file()
