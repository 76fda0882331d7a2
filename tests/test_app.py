"""``densediff app`` (issue #25): the local web page. The page is served on loopback and driven
with ``gradio_client`` as the browser does (upload, predict, move the step slider); what it
shows and offers for download equals ``Predictor.predict``'s result, bad uploads are one line
on the page, and the CLI checks its options before the model loads. The pictures every result
type gives the page are checked per task without Gradio. Tests needing Gradio skip without the
``app`` extra; the real-browser test is ``tests/test_app_browser.py``."""

import json
import socket
import sys

import numpy as np
import pytest
from PIL import Image

import densediff
from densediff.api import Predictor
from densediff.app import key_html, list_examples, run_predict
from densediff.cli.main import main
from densediff.errors import UserError
from densediff.tasks import build_model, class_info, load_config
from densediff.testing.assertions import one_line_error
from densediff.testing.tiny import TINY
from densediff.viz import colorize

# Gradio's queue calls pandas options that pandas 3 deprecates (not ours to fix)
pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image(path, h=40, w=56, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _tiny_predictor(config: str) -> Predictor:
    """An untrained tiny model of ``config`` (pictures and wiring only)."""
    cfg = load_config(config, TINY[config])
    names, palette = class_info(cfg)
    return Predictor(build_model(cfg, len(names)), cfg, names, palette)


# ------------------------------------------------------------------------------------------
# the pictures each result type gives the page (no Gradio needed)


def test_segmentation_views_legend_uncertainty_steps_and_summary(tiny_ddp_run, tmp_path):
    predictor = densediff.load(tiny_ddp_run)
    img = _image(tmp_path / "a.png")
    shown = run_predict(predictor, str(img), "a.png", tmp_path / "out", steps=3, seed=4)
    pred = predictor.predict(str(img), steps=3, seed=4)
    assert np.array_equal(shown.pred.mask, pred.mask)
    assert np.array_equal(shown.prediction.image, pred.overlay)
    assert [n for n, _ in shown.prediction.legend] == predictor.class_names
    key = key_html(shown.prediction)
    assert all(n in key for n in predictor.class_names) and "dd-swatch" in key
    assert np.array_equal(shown.uncertainty.image,
                          shown.uncertainty.scale.colorize(pred.uncertainty))
    assert "label changed" in key_html(shown.uncertainty)
    assert shown.num_steps == 3 and shown.step.title == "step 3 of 3"
    for s in (1, 2, 3):
        assert np.array_equal(pred.step_view(s).image, colorize(pred.trajectory[s - 1],
                                                                predictor.palette))
    with pytest.raises(UserError, match="between 1 and 3"):
        pred.step_view(4)
    # the downloads: the predict files with the uncertainty maps, and the summary JSON
    names = sorted(p.rsplit("/", 1)[-1] for p in shown.files)
    assert names == sorted(f"a_{k}" for k in ("mask.png", "color.png", "overlay.png",
                                              "entropy.png", "uncertainty.png", "summary.json"))
    mask_file = next(p for p in shown.files if p.endswith("_mask.png"))
    assert np.array_equal(np.asarray(Image.open(mask_file)), pred.mask)
    summary = json.loads(open(shown.files[-1]).read())
    assert (summary["steps"], summary["seed"], summary["height"], summary["width"]) == (3, 4, 40, 56)
    assert abs(sum(summary["classes"].values()) - 1) < 1e-4


def test_random_starts_reach_the_sampler(tiny_ddp_run, tmp_path):
    predictor = densediff.load(tiny_ddp_run)
    img = _image(tmp_path / "a.png")
    assert predictor.takes_starts
    one = predictor.predict(str(img), steps=2, seed=1)
    two = predictor.predict(str(img), steps=2, seed=1, starts=3)
    assert not np.allclose(one.probs, two.probs)  # three starts averaged, not one
    assert np.array_equal(two.mask, predictor.predict(str(img), steps=2, seed=1, starts=3).mask)
    with pytest.raises(UserError, match="starts: must be between 1 and 100"):
        predictor.predict(str(img), starts=0)
    baseline = _tiny_predictor("generated/baseline.yaml")
    assert not baseline.takes_starts
    with pytest.raises(UserError, match="starts: this checkpoint has no random starts"):
        baseline.predict(str(img), starts=2)


def test_depth_views_are_in_metres(tmp_path):
    predictor = _tiny_predictor("generated/depth_ddp.yaml")
    img = _image(tmp_path / "room.png", 32, 48)
    pred = predictor.predict(str(img), steps=3, seed=0, starts=2)
    view = pred.prediction_view()
    assert np.array_equal(view.image, pred.color) and "depth (m)" in view.scale.label
    assert (view.scale.vmin, view.scale.vmax) == (pred.min_depth, pred.max_depth)
    unc = pred.uncertainty_view()
    assert unc.scale.label.endswith("(m)") and unc.scale.vmax >= float(pred.uncertainty.max())
    assert "depth (m)" in key_html(view) and "dd-ramp" in key_html(view)
    assert pred.num_steps == 3 and pred.step_view(1).scale == view.scale
    summary = pred.summary()
    assert summary["task"] == "depth" and "mean_uncertainty_starts_m" in summary
    assert pred.depth.min() - 1e-6 <= summary["depth_m"]["mean"] <= pred.depth.max() + 1e-6


def test_bev_views_from_a_dataset_sample(tmp_path):
    predictor = _tiny_predictor("generated/bev_ddp.yaml")
    sample = predictor.dataset("val")[0]
    shown = run_predict(predictor, sample, "val:0", tmp_path, steps=2, seed=0)
    assert shown.input.image.shape[2] == 3 and shown.num_steps == 2
    assert [n for n, _ in shown.prediction.legend][:-1] == predictor.class_names
    assert shown.uncertainty.scale is not None and shown.summary["task"] == "bev"
    assert set(shown.summary["classes"]) == set(predictor.class_names)


# ------------------------------------------------------------------------------------------
# the command line: options checked before the model loads


def test_cli_app_refuses_bad_options_in_one_line(tmp_path, capsys):
    missing = str(tmp_path / "nope.safetensors")  # never read: the options fail first
    pytest.importorskip("gradio")
    for argv, where in ((["--port", "70000"], "--port"), (["--host", ""], "--host"),
                        (["--examples", str(tmp_path / "none")], "--examples"),
                        (["--device", "tpu"], "--device"), (["--precision", "fp8"], "precision")):
        err = one_line_error(capsys, main(["app", missing, *argv]), where)
        assert "nope" not in err, err
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(capsys, main(["app", missing, "--examples", str(empty)]), "no images")
    (empty / "broken.png").write_bytes(b"no image")
    one_line_error(capsys, main(["app", missing, "--examples", str(empty)]), "broken.png")


def test_cli_app_without_gradio_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    one_line_error(capsys, main(["app", str(tmp_path / "x.safetensors")]),
                   'pip install "densediff[app]"')


def test_list_examples_sorted_images_only(tmp_path):
    for name in ("b.png", "a.jpg"):
        _image(tmp_path / name)
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in list_examples(tmp_path)] == ["a.jpg", "b.png"]


# ------------------------------------------------------------------------------------------
# the served page, driven through gradio_client


@pytest.fixture(scope="module")
def served(tiny_ddp_run, tmp_path_factory):
    pytest.importorskip("gradio")
    client_mod = pytest.importorskip("gradio_client")
    from densediff.app import build_app

    folder = tmp_path_factory.mktemp("app")
    examples = [_image(folder / "scene.png")]
    predictor = densediff.load(tiny_ddp_run)
    app = build_app(predictor, source=str(tiny_ddp_run), examples=examples)
    url = app.launch("127.0.0.1", _free_port(), block=False, quiet=True)
    yield predictor, client_mod, url, folder
    app.close()


def _client(served):
    _, client_mod, url, _ = served
    return client_mod.Client(url, verbose=False)


def test_page_binds_to_loopback_and_predicts_like_the_library(served):
    predictor, client_mod, url, folder = served
    assert url.startswith("http://127.0.0.1:")
    client = _client(served)
    img = folder / "scene.png"
    out = client.predict(client_mod.handle_file(str(img)), 3, 7, 1, api_name="/predict")
    status, _inp, shown, key, unc, unc_key, slider, step, _sk, files, summary = out
    pred = predictor.predict(str(img), steps=3, seed=7)
    assert "mask after 3 steps" in status and "seed 7" in status
    assert np.array_equal(np.asarray(Image.open(shown["value"]).convert("RGB")), pred.overlay)
    assert all(n in key for n in predictor.class_names)
    assert np.array_equal(np.asarray(Image.open(unc["value"]).convert("RGB")),
                          pred.uncertainty_view().image)
    assert "label changed" in unc_key
    assert (slider["value"], slider["maximum"], slider["visible"]) == (3, 3, True)
    assert step["label"] == "step 3 of 3"
    mask = next(f for f in files if f.endswith("_mask.png"))
    assert np.array_equal(np.asarray(Image.open(mask)), pred.mask)
    assert summary["steps"] == 3 and summary["seed"] == 7 and summary["input"] == "scene.png"
    # the step slider (same session): step 1's picture is the first trajectory mask
    pic, _ = client.predict(1, api_name="/step")
    assert np.array_equal(np.asarray(Image.open(pic["value"]).convert("RGB")),
                          colorize(pred.trajectory[0], predictor.palette))
    assert pic["label"] == "step 1 of 3"


def test_page_random_starts(served):
    predictor, client_mod, _, folder = served
    img = folder / "scene.png"
    out = _client(served).predict(client_mod.handle_file(str(img)), 2, 0, 3, api_name="/predict")
    pred = predictor.predict(str(img), steps=2, seed=0, starts=3)
    assert np.array_equal(np.asarray(Image.open(out[2]["value"]).convert("RGB")), pred.overlay)
    assert out[-1]["starts"] == 3


def test_page_bad_uploads_are_one_line(served, monkeypatch):
    _, client_mod, _, folder = served
    client = _client(served)
    bad = folder / "holiday.png"
    bad.write_bytes(b"this is not a picture")
    status = client.predict(client_mod.handle_file(str(bad)), 3, 0, 1, api_name="/predict")[0]
    assert status.startswith("**error:**") and "holiday.png: not an image" in status, status
    assert "Traceback" not in status and "/gradio/" not in status and "\n" not in status
    big = _image(folder / "big.png", 64, 64)
    monkeypatch.setenv("DENSEDIFF_MAX_IMAGE_PIXELS", "1000")  # the server reads it per upload
    status = client.predict(client_mod.handle_file(str(big)), 3, 0, 1, api_name="/predict")[0]
    assert "big.png: 64x64" in status and "above the limit" in status, status


def test_bev_page_picks_dataset_samples(tmp_path):
    """BEV models take samples of their dataset: the page offers a split and an index instead
    of an upload; a wrong index is one line."""
    pytest.importorskip("gradio")
    client_mod = pytest.importorskip("gradio_client")
    from densediff.app import build_app

    predictor = _tiny_predictor("generated/bev_ddp.yaml")
    app = build_app(predictor, source="bev.safetensors")
    url = app.launch("127.0.0.1", _free_port(), block=False, quiet=True)
    try:
        client = client_mod.Client(url, verbose=False)
        out = client.predict("val", 1, 2, 3, 1, api_name="/predict")
        pred = predictor.predict(predictor.dataset("val")[1], steps=2, seed=3)
        assert "map after 2 steps" in out[0], out[0]
        assert np.array_equal(np.asarray(Image.open(out[2]["value"]).convert("RGB")), pred.color)
        assert np.array_equal(np.asarray(Image.open(out[4]["value"]).convert("RGB")),
                              pred.uncertainty_picture())
        assert "bev.png" in " ".join(out[9]) and out[10]["task"] == "bev"
        status = client.predict("val", 99, 2, 3, 1, api_name="/predict")[0]
        assert status.startswith("**error:** sample index: must be between 0 and 1"), status
    finally:
        app.close()
