"""Property tests (issue #23): every parser and reader of untrusted input gives, for any input,
either a valid result or one ``UserError`` line, never another exception and never a hang.

Example counts are small (``max_examples`` 25-60) so that the file runs in a few seconds.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from densediff.errors import UserError  # noqa: E402
from densediff.utils import checks  # noqa: E402

FAST = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=20)


def _one_line(err: UserError) -> None:
    assert str(err) and "\n" not in str(err)


# ---------------------------------------------------------------------------------------------
# config overrides (parse, apply, validate)

KEYS = ["train.lr", "train.betas", "train.iters", "data.crop_size", "data.batch_size",
        "model.head.channels", "model.diffusion.scale", "data.train_pipeline.crop_size",
        "model.type", "seed", "train.grad_clip", "eval.aug.scales", "x", "train", "train.lr.x",
        "a..b", ""]
values = st.one_of(
    st.sampled_from(["inf", "-inf", ".nan", ".inf", "1e999", "nan", "[1.5, 0.9]", "[0.9, 0.99]",
                     "[]", "{}", "[32, 32]", "[100000, 100000]", "null", "true", "0", "-1",
                     "1e-3", "10**9", "[[[[[[1]]]]]]", "'x'", "{a: 1}", "&a [*a]", "[", "1:2"]),
    st.text(alphabet=string.printable, max_size=12),
    st.integers(-2**70, 2**70).map(str),
    st.floats().map(repr))


@FAST
@given(st.lists(st.tuples(st.sampled_from(KEYS), values), max_size=3))
def test_config_overrides_give_a_config_or_one_line(pairs):
    from densediff.tasks import load_config

    try:
        cfg = load_config(None, [f"{k}={v}" for k, v in pairs])
    except UserError as e:
        _one_line(e)
        return
    for v in (cfg.train.lr, *cfg.train.betas, cfg.model.diffusion.scale):
        assert v == v and abs(v) != float("inf")  # finite
    assert 0 <= cfg.train.betas[0] < 1 and 0 <= cfg.train.betas[1] < 1


@FAST
@given(st.text(max_size=200))
def test_config_yaml_text_gives_a_config_or_one_line(tmp_path_factory, text):
    from densediff.tasks import load_config

    path = tmp_path_factory.mktemp("y") / "c.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except UserError as e:
        _one_line(e)


# ---------------------------------------------------------------------------------------------
# JSON and nesting


@FAST
@given(st.one_of(st.text(max_size=60), st.integers(0, 200).map(lambda n: "[" * n + "]" * n),
                 st.integers(0, 200).map(lambda n: '{"a":' * n + "1" + "}" * n),
                 json_values.map(json.dumps)))
def test_json_loads_gives_a_value_or_one_line(text):
    try:
        value = checks.json_loads(text, "f.json")
    except UserError as e:
        _one_line(e)
        assert "f.json" in str(e)
        return
    checks.check_nesting(value, "f.json")  # what parsed is within the limits


@FAST
@given(json_values)
def test_check_nesting_accepts_shallow_values(value):
    assert checks.check_nesting(value, "x") is value


def test_check_nesting_refuses_deep_values_without_recursion():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(UserError, match="nested more than 32"):
        checks.check_nesting(deep, "x")


# ---------------------------------------------------------------------------------------------
# deploy.json

DEPLOY_KEYS = ["format", "format_version", "task", "kind", "input_size", "graphs", "config",
               "map_channels", "feature_grid", "feature_channels", "classes", "opset"]


def _valid_deploy() -> dict:
    return {"format": "densediff-onnx", "format_version": 1, "task": "segmentation",
            "kind": "ddp", "input_size": [32, 32],
            "graphs": {"encoder": "encoder.onnx", "step": "step.onnx"}, "config": {},
            "map_channels": 16, "feature_grid": [8, 8], "feature_channels": 16,
            "classes": ["a", "b"], "opset": 17}


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(DEPLOY_KEYS), json_values, max_size=4),
       st.lists(st.sampled_from(DEPLOY_KEYS), max_size=2))
def test_read_deploy_gives_a_description_or_one_line(tmp_path_factory, changes, dropped):
    from densediff.deploy.runtime import read_deploy

    folder = tmp_path_factory.mktemp("d")
    meta = {**_valid_deploy(), **changes}
    for k in dropped:
        meta.pop(k, None)
    (folder / "deploy.json").write_text(json.dumps(meta))
    try:
        got = read_deploy(folder)
    except UserError as e:
        _one_line(e)
        assert "deploy.json" in str(e) or str(folder) in str(e)
        return
    checks.check_size(got["input_size"], "input_size")  # what passed is bounded
    assert set(got["graphs"]) == {"encoder", "step"} if got["kind"] == "ddp" else True


# ---------------------------------------------------------------------------------------------
# checkpoint headers and metadata


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=64), st.integers(0, 2**64 - 1))
def test_checkpoint_header_bytes_give_metadata_or_one_line(tmp_path_factory, body, length):
    import struct

    from densediff.utils.checkpoint import load_metadata

    path = tmp_path_factory.mktemp("c") / "x.safetensors"
    path.write_bytes(struct.pack("<Q", length) + body)
    try:
        load_metadata(path)
    except UserError as e:
        _one_line(e)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["format", "config", "iteration", "kind", "x"]),
                       st.one_of(st.text(max_size=20), json_values.map(json.dumps),
                                 st.integers(0, 300).map(lambda n: "[" * n + "]" * n)),
                       max_size=4))
def test_checkpoint_metadata_gives_a_model_or_one_line(tmp_path_factory, meta):
    import torch
    from safetensors.torch import save_file

    import densediff

    path = tmp_path_factory.mktemp("m") / "x.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"format": "densediff", **meta})
    try:
        densediff.load(path)
    except UserError as e:
        _one_line(e)


# ---------------------------------------------------------------------------------------------
# command-line values: --steps, --controls, --size, --seed


@FAST
@given(st.one_of(st.text(max_size=20), st.lists(st.integers(-5, 2000), max_size=5).map(
    lambda v: ",".join(map(str, v)))))
def test_parse_steps(text):
    """The CLI only parses (the library checks the bounds: test_check_steps below)."""
    from densediff.cli.main import parse_steps

    try:
        steps = parse_steps(text, low=1)
    except UserError as e:
        _one_line(e)
        assert "--steps" in str(e)
        return
    assert steps and all(n >= 1 for n in steps)
    assert steps == [int(t) for t in text.split(",") if t.strip()]


@FAST
@given(st.lists(st.integers(-5, 10**6), min_size=1, max_size=4))
def test_check_steps(steps):
    from densediff.limits import MAX_SAMPLING_STEPS
    from densediff.models.interface import MapModel
    from densediff.pipelines import check_steps

    model = MapModel()
    model.min_steps, model.max_steps = 1, None
    try:
        check_steps(model, steps, key="--steps")
    except UserError as e:
        _one_line(e)
        assert str(e).startswith("--steps: ")
        assert not all(1 <= n <= MAX_SAMPLING_STEPS for n in steps)
        return
    assert all(1 <= n <= MAX_SAMPLING_STEPS for n in steps)


@FAST
@given(st.one_of(st.text(max_size=20), st.lists(
    st.tuples(st.sampled_from(["noise", "zero", "x", ""]),
              st.one_of(st.floats(), st.text(max_size=4).map(str))), max_size=3).map(
    lambda v: ",".join(f"{k}@{t}" for k, t in v))))
def test_parse_controls(text):
    from densediff.cli.main import parse_controls

    try:
        pairs = parse_controls(text)
    except UserError as e:
        _one_line(e)
        assert "--controls" in str(e)
        return
    assert pairs is None or all(k in ("noise", "zero") and 0 <= t <= 1 for k, t in pairs)


@FAST
@given(st.one_of(st.lists(st.integers(-2**40, 2**40), min_size=0, max_size=3),
                 st.lists(json_values, max_size=3)))
def test_check_size(size):
    try:
        h, w = checks.check_size(size, "--size")
    except UserError as e:
        _one_line(e)
        assert "--size" in str(e)
        return
    assert 32 <= h <= 8192 and 32 <= w <= 8192 and h * w <= checks.MAX_INPUT_PIXELS


# ---------------------------------------------------------------------------------------------
# classes.txt


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=80), st.text(max_size=80).map(str.encode),
                 st.lists(st.tuples(st.text(alphabet=string.ascii_letters + " é", min_size=1,
                                            max_size=6),
                                    st.lists(st.integers(-300, 300), max_size=3)), max_size=4
                          ).map(lambda rows: "\n".join(
                              f"{n} {' '.join(map(str, c))}" for n, c in rows).encode()),
                 st.text(max_size=40).map(lambda t: b"\xef\xbb\xbf" + t.encode())))
def test_classes_file_gives_classes_or_one_line(tmp_path_factory, data):
    from densediff.data.classes import read_classes_file

    path = tmp_path_factory.mktemp("k") / "classes.txt"
    path.write_bytes(data)
    try:
        names, palette = read_classes_file(path)
    except UserError as e:
        _one_line(e)
        assert "classes.txt" in str(e)
        return
    assert len(names) == len(palette) >= 1
    assert not any("\ufeff" in n for n in names)  # the BOM never reaches a name
    assert palette.dtype.name == "uint8"


# ---------------------------------------------------------------------------------------------
# environment variables


# what an environment variable can hold: no NUL byte, no lone surrogate (the OS cannot pass
# either; os.environ refuses them before our code runs)
env_text = st.one_of(st.text(st.characters(blacklist_categories=("Cs",),
                                           blacklist_characters="\x00"), max_size=12),
                     st.sampled_from(
    ["inf", "-inf", "nan", "1e999", "5e7", "0", "-1", "  12 ", "0x10", "1_000", "2.5", ""]),
    st.integers(-2**80, 2**80).map(str), st.floats().map(repr))


@FAST
@given(env_text)
def test_env_int(raw):
    try:
        value = checks.env_int("X_TEST", 7, 0, 1000, env={"X_TEST": raw})
    except UserError as e:
        _one_line(e)
        assert "X_TEST=" in str(e)
        return
    assert isinstance(value, int) and 0 <= value <= 1000


@FAST
@given(env_text)
def test_env_float(raw):
    try:
        value = checks.env_float("X_TEST", 0.5, 0.0, 1.0, env={"X_TEST": raw})
    except UserError as e:
        _one_line(e)
        return
    assert 0.0 <= value <= 1.0


@FAST
@given(env_text)
def test_max_image_pixels_env(raw):
    import os

    from densediff.data.io import MAX_PIXELS_ENV, max_image_pixels

    old = os.environ.get(MAX_PIXELS_ENV)
    os.environ[MAX_PIXELS_ENV] = raw
    try:
        value = max_image_pixels()
        assert isinstance(value, int) and value >= 0
    except UserError as e:
        _one_line(e)
        assert MAX_PIXELS_ENV in str(e)
    finally:
        if old is None:
            os.environ.pop(MAX_PIXELS_ENV, None)
        else:
            os.environ[MAX_PIXELS_ENV] = old


# ---------------------------------------------------------------------------------------------
# injective output names

name_chars = string.ascii_letters[:4] + "._-"
file_names = st.tuples(st.text(alphabet=name_chars, min_size=1, max_size=6),
                       st.sampled_from([".png", ".jpg", ".JPG", ".bmp", ".jpeg"])).map(
    lambda t: t[0] + t[1])


@settings(max_examples=60, deadline=None)
@given(st.sets(file_names, min_size=1, max_size=8))
def test_output_names_are_injective(names):
    from densediff.cli.main import _output_stems

    files = [Path("in") / n for n in sorted(names)]
    stems = _output_stems(files)
    assert len(set(stems)) == len(files)
    suffixes = ["mask.png", "color.png", "overlay.png", "probs.npy", "depth.png",
                "depth16.png", "uncertainty.npy", "trajectory.png"]
    outputs = [f"{s}_{k}" for s in stems for k in suffixes]
    assert len(set(outputs)) == len(outputs)  # no two results write the same file
    single = [f for f in files if [g.stem for g in files].count(f.stem) == 1
              and not any(g.name == f.stem for g in files)]
    for f in single:  # the plain stem stays where it is unambiguous
        i = files.index(f)
        assert stems[i] in (f.stem, f"{f.stem}_{f.suffix[1:]}", f.name)
