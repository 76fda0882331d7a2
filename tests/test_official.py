"""Official DDP checkpoints: reading, recognition, strict conversion of every released layout,
the Hub source, the `convert`/`models` commands, and the three forward-pass fixes (padding,
accumulated output, depth without time input).

Evidence without the oracle: ``tests/fixtures/official`` holds what the official code computed
(``benchmarks/official_fixture.py``, run once in the oracle venv): two tiny backbones built with
mmseg's Swin and mmcls' ConvNeXt, their weights and their outputs at sizes that are and are not
multiples of 32, and the tensor names and shapes of every released architecture. The full
models are compared with the oracle itself in ``tests/test_official_parity.py`` (skipped without
it) and ``benchmarks/official_parity.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from densediff.cli.main import main
from densediff.config import EncoderConfig
from densediff.encoders.hf import build_hf_encoder
from densediff.errors import CheckpointError, UserError
from densediff.official import (
    RELEASED,
    convert_state,
    describe,
    load_official,
    parse_hub_uri,
    read_official,
    unfold_to_concat,
)
from densediff.official.convert import released_for
from densediff.tasks import build_model, load_config

FIX = Path(__file__).parent / "fixtures" / "official"
TINY = {"swin": dict(embed_dim=8, depths=[2, 2, 2, 2], num_heads=[1, 1, 2, 2]),
        "convnext": dict(hidden_sizes=[8, 16, 16, 32], depths=[2, 2, 2, 2])}


def _layout(name: str) -> dict[str, list[int]]:
    return json.loads((FIX / f"keys_{name}.json").read_text())


# ------------------------------------------------------------------------------------------
# backbones against the recorded official outputs (the padding fix)


def _tiny_encoder(family: str):
    enc = build_hf_encoder(EncoderConfig(name=family, variant="tiny"), **TINY[family])
    rec = torch.load(FIX / f"{family}_tiny.pt")
    own = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    converted = convert_state(rec["state_dict"], family, own, "fixture")
    enc.load_state_dict({k.removeprefix("encoder."): v for k, v in converted.items()})
    return enc.eval(), rec


@pytest.mark.parametrize("family", ["swin", "convnext"])
@pytest.mark.parametrize("size", ["76x116", "64x96"])
def test_backbone_equals_the_official_one_at_sizes_that_are_and_are_not_multiples_of_32(
        family, size):
    enc, rec = _tiny_encoder(family)
    with torch.no_grad():
        ours = enc(rec[size]["input"])
    for level, (a, b) in enumerate(zip(ours, rec[size]["features"])):
        assert a.shape == b.shape, (level, a.shape, b.shape)
        # float32 round-off on maps of size ~3 stays near 1e-6; a wrong eps (mmcls' 1e-5 in
        # ConvNeXt's downsampling norms vs 1e-6) already gives 2e-5
        assert (a - b).abs().max() <= 5e-6, level


@pytest.mark.parametrize("family", ["swin", "convnext"])
def test_padding_to_32_first_would_not_match_the_official_backbone(family):
    """The old behaviour (pad the input to a multiple of 32, crop the outputs) differs from
    the official code at 76 x 116: so the parity above is evidence, not a tautology."""
    enc, rec = _tiny_encoder(family)
    enc.pads_input = True
    with torch.no_grad():
        ours = enc(rec["76x116"]["input"])
    last = rec["76x116"]["features"][-1]
    assert ours[-1].shape != last.shape or (ours[-1] - last).abs().max() > 1e-3


def test_swin_keeps_its_window_after_a_small_input():
    """transformers shrinks a Swin layer's window for maps below it and keeps it shrunk; the
    official Swin (and densediff) keeps the window, so a large input after a small one gives
    the same features as on a fresh model."""
    enc, rec = _tiny_encoder("swin")
    with torch.no_grad():
        enc(torch.randn(1, 3, 32, 32))
        again = enc(rec["76x116"]["input"])
    assert (again[0] - rec["76x116"]["features"][0]).abs().max() <= 1e-5


def test_unfold_to_concat_turns_mmseg_patch_merging_into_the_concatenation_order():
    """mmseg merges 2x2 patches with nn.Unfold (channels c*4 + p); transformers concatenates
    x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2] (channels k*C + c)."""
    torch.manual_seed(0)
    c, h, w = 5, 6, 8
    x = torch.randn(2, h, w, c)
    w_mm, norm_w, norm_b = torch.randn(2 * c, 4 * c), torch.randn(4 * c), torch.randn(4 * c)
    unfolded = F.unfold(x.permute(0, 3, 1, 2), kernel_size=2, stride=2).transpose(1, 2)
    ref = F.linear(F.layer_norm(unfolded, (4 * c,), norm_w, norm_b), w_mm)

    def concat_merge(weight, nw, nb):  # the original Swin / transformers patch merging
        cat = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                        -1).reshape(2, -1, 4 * c)
        return F.linear(F.layer_norm(cat, (4 * c,), nw, nb), weight)

    out = concat_merge(unfold_to_concat(w_mm), unfold_to_concat(norm_w), unfold_to_concat(norm_b))
    assert torch.allclose(out, ref, atol=1e-5)
    assert not torch.allclose(concat_merge(w_mm, norm_w, norm_b), ref, atol=1e-2)


# ------------------------------------------------------------------------------------------
# every released layout converts strictly


def _meta_state(layout: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in layout.items()}


LAYOUTS = sorted(p.stem.removeprefix("keys_") for p in FIX.glob("keys_*.json"))


@pytest.mark.parametrize("name", LAYOUTS)
def test_every_released_layout_is_recognised_and_converts_strictly(name):
    state = _meta_state(_layout(name))
    arch = describe(state, name)
    entry = released_for(arch, {}, name + ".pth")
    assert entry.name == name
    with torch.device("meta"):
        model = build_model(load_config(entry.config), arch.num_classes)
    own = model.state_dict()
    converted = convert_state(state, arch.backbone, own, name)
    assert set(converted) == set(own)
    assert all(converted[k].shape == own[k].shape for k in own)
    # the aligned fine-tunes share the layout: the file name (or the meta config) decides
    if "convnext_t_" in name or "convnext_l_" in name:
        aligned = name.replace("160k_cityscapes", "5k_cityscapes_aligned")
        assert released_for(arch, {}, aligned + ".pth").name == aligned
        assert released_for(arch, {"config": "model = dict(type='SelfAlignedDDP')"},
                            "x.pth").aligned


def test_every_segmentation_release_has_a_recorded_layout_or_shares_one():
    seg = [m for m in RELEASED if m.dataset != "nuscenes"]
    assert len(seg) == 10
    for m in seg:
        base = m.name.replace("5k_cityscapes_aligned", "160k_cityscapes")
        assert base in LAYOUTS, m.name


def test_a_missing_or_extra_key_is_one_error_listing_them():
    name = "ddp_convnext_t_4x4_512x1024_160k_cityscapes"
    state = _meta_state(_layout(name))
    with torch.device("meta"):
        own = build_model(load_config("cityscapes/ddp_convnext_t.yaml"), 19).state_dict()
    broken = dict(state)
    del broken["decode_head.encoder.layers.3.norms.1.weight"]
    broken["decode_head.extra.weight"] = torch.empty(3, device="meta")
    broken["neck.1.down.conv.weight"] = torch.empty(256, 512, 1, 1, device="meta")
    with pytest.raises(CheckpointError) as e:
        convert_state(broken, "convnext", own, "x.pth")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("x.pth: does not convert strictly")
    for part in ("decode_head.extra.weight", "decoder.layers.3.norm2.weight", "neck.merge.0.weight"):
        assert part in msg


# ------------------------------------------------------------------------------------------
# reading official files safely


def _official_file(path: Path, state: dict, meta: dict | None = None) -> Path:
    torch.save({"meta": meta or {}, "state_dict": state, "optimizer": {}}, path)
    return path


def test_reader_accepts_mmcv_metadata_with_numpy_scalars(tmp_path):
    meta = {"CLASSES": ("a", "b"), "PALETTE": [[1, 2, 3], [4, 5, 6]], "mmcv_version": "1.7.2",
            "hook_msgs": {"best_score": np.float64(0.5), "best_ckpt": "x.pth"}, "iter": 160000}
    f = _official_file(tmp_path / "c.pth", {"module.w": torch.ones(2)}, meta)
    state, got = read_official(f)
    assert list(state) == ["w"] and got["hook_msgs"]["best_score"] == 0.5


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("payload,expect", [
    ({"state_dict": {"w": torch.ones(1)}, "meta": {"x": _Evil()}}, "refused"),
    ([1, 2], "top level is list"),
    ({"state_dict": {}}, "holds no state_dict"),
    ({"state_dict": {"w": 3}}, "not a named tensor"),
    ({"state_dict": {"w": torch.ones(1)}, "meta": {"a": np.arange(3)}}, "_reconstruct"),
])
def test_reader_refuses_bad_files_in_one_line(tmp_path, payload, expect):
    f = tmp_path / "bad.pth"
    torch.save(payload, f)
    with pytest.raises(CheckpointError) as e:
        read_official(f)
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_reader_refuses_missing_truncated_and_folder(tmp_path):
    f = _official_file(tmp_path / "c.pth", {"w": torch.ones(1000)})
    data = f.read_bytes()
    (tmp_path / "t.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "g.pth").write_text("garbage\n")
    for bad, expect in ((tmp_path / "none.pth", "not found"), (tmp_path / "t.pth", "corrupt"),
                        (tmp_path / "g.pth", "corrupt or not a torch checkpoint"),
                        (tmp_path, "not a regular file")):
        with pytest.raises(CheckpointError, match=expect):
            read_official(bad)


def test_non_ddp_and_bev_checkpoints_are_refused_by_name(tmp_path):
    with pytest.raises(CheckpointError, match="not an official DDP"):
        describe({"backbone.x": torch.ones(1)}, "a.pth")
    bev = {"encoders.camera.backbone.patch_embed.projection.weight": torch.ones(1),
           "embedding_table.weight": torch.ones(7, 256), "heads.map.conv_seg.weight": torch.ones(1)}
    with pytest.raises(CheckpointError, match="BEV"):  # the official BEV DDP's top-level names
        describe(bev, "b.pth")


# ------------------------------------------------------------------------------------------
# end to end: convert, load, the Hub (one random ConvNeXt-T file in the official layout)


@pytest.fixture(scope="module")
def official_cnx(tmp_path_factory) -> Path:
    name = "ddp_convnext_t_4x4_512x1024_160k_cityscapes"
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(shape, generator=g) * 0.02 if k.endswith(("weight", "bias", "gamma",
                                                                      "weights"))
                 else torch.ones(shape)) for k, shape in _layout(name).items()}
    for k in state:
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(5)
    names = [f"c{i}" for i in range(19)]
    f = tmp_path_factory.mktemp("official") / f"{name}.pth"
    return _official_file(f, state, {"CLASSES": names, "PALETTE": [[i, i, i] for i in range(19)],
                                     "hook_msgs": {"best_score": np.float64(0.8)}})


def test_convert_writes_a_run_folder_that_loads_to_the_same_weights(official_cnx, tmp_path,
                                                                      capsys):
    import densediff

    out = tmp_path / "run"
    assert main(["convert", str(official_cnx), str(out)]) == 0
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "best.safetensors").is_file()
    direct, _, entry = load_official(official_cnx)
    assert entry.config == "cityscapes/ddp_convnext_t.yaml"
    pred = densediff.load(out)
    a, b = pred.model.state_dict(), direct.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert pred.class_names[:2] == ["c0", "c1"]  # from the checkpoint's metadata
    # nothing is overwritten: a second convert into the same folder is refused in one line
    before = (out / "checkpoints" / "best.safetensors").stat().st_mtime_ns
    assert main(["convert", str(official_cnx), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "checkpoints" / "best.safetensors").stat().st_mtime_ns == before


def test_predict_takes_the_official_file_directly(official_cnx):
    import densediff

    pred = densediff.load(official_cnx, overrides=["data.test_scale=null"])  # no 1024 resize
    assert pred.cfg.data.test_scale is None and pred.class_names[0] == "c0"
    out = pred.predict(np.zeros((40, 56, 3), np.uint8), steps=1)
    assert out.mask.shape == (40, 56) and out.uncertainty is not None


def _hub_cache(root: Path, repo: str, filename: str, src: Path) -> None:
    """A Hugging Face cache holding one file, laid out as huggingface_hub writes it."""
    commit = "0" * 40
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit / filename
    snap.parent.mkdir(parents=True)
    os.symlink(src, snap)


def test_hub_source_reads_the_local_cache_offline(official_cnx, tmp_path, monkeypatch, capsys):
    import densediff

    _hub_cache(tmp_path / "hub", "yfji/DDP-Weight", official_cnx.name, official_cnx)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    uri = f"hf://yfji/DDP-Weight/{official_cnx.name}"
    pred = densediff.load(uri)
    assert pred.num_classes == 19
    # a file that is not cached: one line naming the repository and the file
    assert main(["convert", "hf://yfji/DDP-Weight/nope.pth", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "yfji/DDP-Weight" in err and "nope.pth" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("uri", ["hf://yfji", "hf://yfji/DDP-Weight", "hf://a//b.pth",
                                 "hf://a/b/../c.pth", "hf://a/b/c.pth@"])
def test_bad_hub_uris_are_one_line_errors(uri):
    with pytest.raises(UserError):
        parse_hub_uri(uri)


def test_models_lists_every_release_with_the_authors_numbers_labelled(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for m in RELEASED:
        assert m.name in out and m.hub_uri in out and m.config in out
    assert out.count("reported by the authors, not measured here") == len(RELEASED)


# ------------------------------------------------------------------------------------------
# accumulated output and the depth decoder without time


SMALL = ["model.type=ddp", "model.head.type=deformable", "model.encoder.variant=tiny",
         "model.neck.channels=32", "model.neck.num_groups=8", "model.head.channels=32",
         "model.head.num_layers=2", "model.head.ffn_channels=64", "model.aux_head.channels=32",
         "model.diffusion.embed_channels=32"]


def test_accumulated_output_upsamples_the_mean_step_probabilities():
    """Official: resize(mean_s softmax(logits_s)) then softmax (mmseg); not resize(log p)."""
    torch.manual_seed(0)
    model = build_model(load_config(None, [*SMALL, "model.diffusion.accumulation=true"]), 5).eval()
    img = torch.randn(1, 3, 40, 56)
    traj = model.sample_steps(model.extract(img), 3, seeds=[7])
    mean_p = torch.stack([lg.softmax(2) for lg in traj.steps]).mean((0, 2))
    expect = F.interpolate(mean_p, size=(40, 56), mode="bilinear", align_corners=False)
    got = model.predict_map(img, steps=3, seeds=[7])
    assert torch.allclose(got, expect, atol=1e-6)
    old = F.interpolate(mean_p.log(), size=(40, 56), mode="bilinear", align_corners=False)
    assert not torch.allclose(got.softmax(1), old.softmax(1), atol=1e-3)


def test_official_depth_decoder_has_no_time_input_and_film_is_opt_in():
    cfg = load_config("nyu/ddp_swin_t.yaml")
    assert cfg.model.diffusion.time_input == "none"
    torch.manual_seed(0)
    base = ["model.encoder.name=simple_cnn", "model.head.channels=32", "model.head.num_layers=1",
            "model.head.ffn_channels=64", "model.neck.channels=32", "model.neck.num_groups=8"]
    plain = build_model(load_config("generated/depth_ddp.yaml", base), 1).eval()
    assert not any("time_mlp" in k for k in plain.state_dict())
    feat = plain.extract(torch.randn(1, 3, 64, 64))
    x_t = torch.randn(1, 1, *feat.shape[-2:])
    with torch.no_grad():
        a = plain.denoise(feat, x_t, torch.tensor([5.0]))
        b = plain.denoise(feat, x_t, torch.tensor([-5.0]))
    assert torch.equal(a, b)
    film = build_model(load_config("generated/depth_ddp.yaml",
                                   [*base, "model.diffusion.time_input=t"]), 1).eval()
    assert any("decoder.layers.0.time_mlp" in k for k in film.state_dict())
    n_plain = sum(p.numel() for p in plain.parameters())
    assert sum(p.numel() for p in film.parameters()) > n_plain


def test_whole_image_outputs_resize_to_the_input_size_then_to_the_original_size():
    """mmseg's whole inference resizes the seg logit to the network input, then to the
    original image (two bilinear resizes, which differ from one)."""
    from densediff.pipelines.segmentation import uncertainty_maps

    torch.manual_seed(0)
    model = build_model(load_config(None, [*SMALL, "model.diffusion.accumulation=true"]), 5).eval()
    x = torch.randn(1, 3, 64, 96)
    feat = model.extract(x)
    traj = model.sample_steps(feat, 2, seeds=[3])

    def up(t, *sizes):
        for s in sizes:
            t = F.interpolate(t, size=s, mode="bilinear", align_corners=False)
        return t

    probs, _, _ = uncertainty_maps(model, feat, 2, (27, 41), True, [3], in_size=(64, 96))
    assert torch.allclose(probs, up(traj.output(True), (64, 96), (27, 41)), atol=1e-6)
    assert not torch.allclose(probs, up(traj.output(True), (27, 41)), atol=1e-4)


def test_image_resize_is_bit_exact_with_cv2_inter_linear():
    """mmcv resizes test images with cv2 INTER_LINEAR (fixed point); outputs recorded with cv2
    (benchmarks/official_fixture.py), up- and down-scaling, odd ratios."""
    from densediff.data.transforms import resize_image

    rec = np.load(FIX / "cv2_resize.npz")
    n = len(rec.files) // 2
    assert n >= 8
    for i in range(n):
        src, ref = rec[f"in{i}"], rec[f"out{i}"]
        assert np.array_equal(resize_image(src, ref.shape[:2]), ref), i
    gray = rec["in0"][..., 0]
    assert np.array_equal(resize_image(gray, rec["out0"].shape[:2]), rec["out0"][..., 0])


def test_multi_scale_passes_resize_the_original_image_as_mmseg():
    """mmseg's MultiScaleFlipAug resizes the ORIGINAL image into (int(2048 r), int(512 r)),
    keep ratio: 300 x 397 at r = 0.75 gives 384 x 508 (resizing the 512 x 678 test input by
    0.75 would give 384 x 509)."""
    from densediff.config import EvalConfig
    from densediff.data.transforms import aug_input, normalize, resize_image
    from densediff.pipelines.inference import predict_probs

    data = load_config("ade20k/ddp_swin_t.yaml").data
    rgb = np.random.default_rng(0).integers(0, 256, (300, 397, 3), dtype=np.uint8)
    x = aug_input(rgb, data, 0.75)
    assert x.shape[-2:] == (384, 508)
    expect = normalize(resize_image(rgb, (384, 508)), data.mean, data.std)
    assert torch.equal(x[0], torch.from_numpy(expect).permute(2, 0, 1))

    seen = []

    class Probe(torch.nn.Module):
        def predict_map(self, img):
            seen.append((tuple(img.shape[-2:]), float(img[0, 0, 0, 0])))
            return torch.zeros(1, 2, *img.shape[-2:])

    cfg = EvalConfig(aug={"scales": [0.5, 0.75], "flip": True})
    predict_probs(Probe(), aug_input(rgb, data, 1.0), cfg, ori_size=(300, 397), aug=True,
                  scale_input=lambda r: aug_input(rgb, data, r))
    assert [s for s, _ in seen] == [(256, 339), (256, 339), (384, 508), (384, 508)]
    assert seen[2][1] == float(x[0, 0, 0, 0])  # the pass at 0.75 got exactly that input


def _flip(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, val in flips:
        out[pos] = val
    return bytes(out)


def test_any_hub_uri_or_file_bytes_give_a_result_or_one_user_error(tmp_path):
    """Property: hf:// strings and .pth contents from hypothesis never raise anything but a
    one-line UserError (and never hang)."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.text(max_size=60))
    def uris(tail):
        try:
            repo, name, _ = parse_hub_uri("hf://" + tail)
            assert repo.count("/") == 1 and name
        except UserError as e:
            assert "\n" not in str(e)

    good = _official_file(tmp_path / "good.pth", {"w": torch.ones(3)},
                          {"hook_msgs": {"best_score": np.float64(0.5)}}).read_bytes()
    flips = st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(0, 255)), max_size=8)

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.binary(max_size=400), flips.map(lambda fl: _flip(good, fl))))
    def files(data):
        f = tmp_path / "x.pth"
        f.write_bytes(data)
        try:
            read_official(f)
        except UserError as e:
            assert "\n" not in str(e)

    uris()
    files()
    assert hypothesis.__version__
