"""The two MSDA cores (``grid_sample`` and the ``embedding_bag`` gather), their dispatch, and
the float32 sampling locations under autocast (issue #16).

Both cores are checked against a plain loop-over-points bilinear reference
(:func:`densediff.testing.reference.naive_ms_deform_attn`: values and the gradients in value,
locations and attention weights), on several levels, heads, points, a batch of 2, and
locations on pixel centres, on the map edges, in the one-pixel border and further outside.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch

from densediff.decoders import msda
from densediff.decoders.deformable import DeformableDecoder
from densediff.decoders.msda import (
    IMPLS,
    MSDeformAttn,
    current_msda_impl,
    ms_deform_attn,
    ms_deform_attn_gather,
    ms_deform_attn_grid_sample,
    msda_impl,
)
from densediff.testing.reference import naive_ms_deform_attn

CORES = {"grid_sample": ms_deform_attn_grid_sample, "gather": ms_deform_attn_gather}

# --------------------------------------------------------------------------- reference


SHAPES = [(5, 7), (3, 4)]


def pixel_to_location(px: float, size: int) -> float:
    return (px + 0.5) / size


def special_inputs(dtype=torch.float64, seed=0):
    """Batch 2, 10 queries, 2 heads of 3 channels, levels (5, 7) and (3, 4), 3 points.

    Queries 0-5 hold hand-placed locations (x and y in pixels of each level, turned into
    normalised locations): pixel centres including the corner pixels, the outer map edges (0 and
    1), the one-pixel border outside the map, and further out (more than a pixel outside,
    below 0 and above 1). Queries 6-9 are random in [-0.3, 1.3].
    """
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(SHAPES, dtype=torch.long)
    s = sum(h * w for h, w in SHAPES)
    batch, queries, heads, dims, points, levels = 2, 10, 2, 3, 3, len(SHAPES)
    value = torch.randn(batch, s, heads, dims, generator=gen, dtype=dtype)
    loc = torch.rand(batch, queries, heads, levels, points, 2, generator=gen, dtype=dtype) * 1.6 - 0.3
    # (x, y) in pixels; h, w are substituted per level
    placed = [
        [(0, 0), ("w-1", "h-1"), (2, 1)],                 # pixel centres, corner pixels included
        [(-0.5, 1.0), ("w-0.5", 1.0), (1.0, -0.5)],       # the outer edges: location 0 or 1
        [(1.0, "h-0.5"), (-0.5, -0.5), ("w-0.5", "h-0.5")],
        [(-0.75, 1.25), ("w-0.25", 2.5), (1.5, -0.6)],    # inside the one-pixel border
        [(-1.5, 1.0), ("w+0.5", 1.0), (2.0, "h+0.7")],    # more than a pixel outside
        [(-3.0, -4.0), ("w+3", "h+5"), (-1.25, 2.0)],     # far outside, below 0 and above 1
    ]

    def resolve(v, size):
        if isinstance(v, str):
            return size + float(v[1:]) if len(v) > 1 else float(size)
        return float(v)

    for q, row in enumerate(placed):
        for lvl, (h, w) in enumerate(SHAPES):
            for p, (x, y) in enumerate(row):
                xy = (pixel_to_location(resolve(x, w), w), pixel_to_location(resolve(y, h), h))
                loc[:, q, :, lvl, p] = torch.tensor(xy, dtype=dtype)
    weights = torch.randn(batch, queries, heads, levels * points, generator=gen, dtype=dtype).softmax(-1)
    return value, spatial_shapes, loc, weights.view(batch, queries, heads, levels, points)


def test_special_inputs_cover_the_cases():
    _, _, loc, _ = special_inputs()
    size = torch.tensor([[w, h] for h, w in SHAPES], dtype=torch.float64)[:, None, :]
    pix = loc * size - 0.5
    assert (loc == 0).any() and (loc == 1).any()
    assert (loc < 0).any() and (loc > 1).any()
    assert ((pix < -1) | (pix > size)).any()  # more than one pixel outside
    assert ((pix > -1) & (pix < 0)).any()  # in the border
    assert torch.isclose(pix, pix.round(), atol=1e-9).all(-1).any()  # exactly on pixel centres


@pytest.mark.parametrize("core", sorted(CORES))
def test_cores_match_naive_values_and_grads(core):
    value, spatial_shapes, loc, weights = special_inputs()
    inputs = [t.requires_grad_() for t in (value, loc, weights)]
    fast = CORES[core](value, spatial_shapes, loc, weights)
    slow = naive_ms_deform_attn(value, spatial_shapes, loc, weights)
    assert fast.shape == (2, 10, 2 * 3) and fast.dtype == torch.float64
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    assert not slow[:, 4:6].any() and slow[:, :4].abs().amin() > 0  # queries 4, 5: all outside

    upstream = torch.randn(fast.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads_fast = torch.autograd.grad(fast, inputs, upstream)
    grads_slow = torch.autograd.grad(slow, inputs, upstream)
    size = torch.tensor([[w, h] for h, w in SHAPES], dtype=torch.float64)[:, None, :]
    pix = loc.detach() * size - 0.5
    # on a pixel centre the location derivative is one-sided (the interpolant has a kink); which
    # side grid_sample takes depends on its own rounding of the coordinate, so compare the
    # location gradient away from the kinks for it, everywhere for the gather (same formula)
    kink = torch.isclose(pix, pix.round(), atol=1e-9)
    assert kink.any() and not kink.all()
    for name, g_fast, g_slow in zip(("value", "locations", "weights"), grads_fast, grads_slow):
        if name == "locations" and core == "grid_sample":
            g_fast, g_slow = g_fast[~kink], g_slow[~kink]
        torch.testing.assert_close(g_fast, g_slow, rtol=1e-10, atol=1e-12, msg=name)
    # more than a pixel outside: no gradient reaches the location
    outside = ((pix < -1) | (pix > size)).any(-1, keepdim=True).expand_as(pix)
    assert not grads_fast[1][outside].any()


def test_cores_agree_in_float32():
    value, spatial_shapes, loc, weights = (t.float() for t in special_inputs(seed=3))
    a = ms_deform_attn_gather(value, spatial_shapes, loc, weights)
    b = ms_deform_attn_grid_sample(value, spatial_shapes, loc, weights)
    assert a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)


def test_gather_exact_pixel_centre_and_outside():
    value = torch.arange(6, dtype=torch.float64).view(1, 6, 1, 1)  # a 2x3 map, one channel
    shapes = torch.tensor([[2, 3]])
    weights = torch.ones(1, 3, 1, 1, 1, dtype=torch.float64)
    locations = torch.tensor([(2.5 / 3, 1.5 / 2), (2.0, 2.0), (0.0, 0.0)], dtype=torch.float64)
    out = ms_deform_attn_gather(value, shapes, locations.view(1, 3, 1, 1, 1, 2), weights)
    # pixel (1, 2) reads 5; far outside reads 0; the corner (0, 0) reads a quarter of pixel (0, 0)
    torch.testing.assert_close(out.flatten(), torch.tensor([5.0, 0.0, 0.0], dtype=torch.float64))


def test_gather_gradcheck():
    gen = torch.Generator().manual_seed(2)
    shapes = torch.tensor([(3, 4), (2, 2)])
    value = torch.randn(2, 16, 2, 2, generator=gen, dtype=torch.float64)
    loc = torch.rand(2, 3, 2, 2, 2, 2, generator=gen, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.rand(2, 3, 2, 2, 2, generator=gen, dtype=torch.float64)
    inputs = tuple(t.requires_grad_() for t in (value, loc, weights))
    assert torch.autograd.gradcheck(lambda v, lo, w: ms_deform_attn_gather(v, shapes, lo, w), inputs)


@pytest.mark.parametrize("core", sorted(CORES))
def test_bf16_value_with_float32_locations(core):
    """A bf16 value with fp32 locations and weights runs, returns bf16, and is close to fp32.

    Tolerance: the bf16 value is rounded to 8 significant bits (relative error 2**-9) and so is
    the output; the gather also rounds the corner weights to bf16. The outputs here are below
    ~1.2 in magnitude (a bf16 ulp there is at most 2**-7 ~ 0.008); the errors measured were at
    most 0.006, so 2e-2 absolute (about 2.5 ulps) leaves margin.
    """
    value, spatial_shapes, loc, weights = (t.float() for t in special_inputs(seed=4))
    expected = CORES[core](value, spatial_shapes, loc, weights)
    value_bf16 = value.bfloat16().requires_grad_()
    loc.requires_grad_()
    out = CORES[core](value_bf16, spatial_shapes, loc, weights)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=2e-2)
    assert (out.float() - expected).abs().max() > 0  # it did run in bf16
    out.float().square().sum().backward()
    assert value_bf16.grad.dtype == torch.bfloat16 and loc.grad.dtype == torch.float32
    assert torch.isfinite(loc.grad).all() and loc.grad.abs().sum() > 0


def test_gather_bf16_matches_grid_sample_bf16():
    value, spatial_shapes, loc, weights = (t.float() for t in special_inputs(seed=5))
    value = value.bfloat16()
    torch.testing.assert_close(ms_deform_attn_gather(value, spatial_shapes, loc, weights).float(),
                               ms_deform_attn_grid_sample(value, spatial_shapes, loc, weights).float(),
                               rtol=0, atol=2e-2)


@pytest.mark.parametrize("core", sorted(CORES))
def test_cores_reject_wrong_shapes(core):
    value, _, loc, weights = special_inputs()
    with pytest.raises(ValueError, match="spatial_shapes"):
        CORES[core](value, torch.tensor([[5, 7]]), loc, weights)


# --------------------------------------------------------------------------- dispatch


@pytest.fixture
def spies(monkeypatch):
    """Replace both cores in the msda module by recorders that call through."""
    calls: list[str] = []
    for name, core in CORES.items():
        def spy(*args, _name=name, _core=core):
            calls.append(_name)
            return _core(*args)
        monkeypatch.setattr(msda, f"ms_deform_attn_{name}", spy)
    return calls


def small_inputs(requires_grad=False):
    value, spatial_shapes, loc, weights = (t.float() for t in special_inputs())
    if requires_grad:
        for t in (value, loc, weights):
            t.requires_grad_()
    return value, spatial_shapes, loc, weights


def test_msda_impl_chooses_the_named_core(spies):
    inputs = small_inputs()
    assert current_msda_impl() == "auto"
    with msda_impl("gather"):
        assert current_msda_impl() == "gather"
        ms_deform_attn(*inputs)
    with msda_impl("grid_sample"):
        ms_deform_attn(*inputs)
        ms_deform_attn(*inputs, impl="gather")  # the argument beats the context
    assert spies == ["gather", "grid_sample", "gather"]


def test_auto_picks_gather_without_gradients_and_the_training_core_with(spies):
    # with gradients: what measured faster for forward + backward, per device type
    train = "gather"  # CPU
    assert msda._auto_train_impl(torch.device("cpu")) == train
    assert msda._auto_train_impl(torch.device("cuda", 0)) == "grid_sample"  # not measured there
    ms_deform_attn(*small_inputs(requires_grad=True))
    with torch.no_grad():
        ms_deform_attn(*small_inputs(requires_grad=True))
    ms_deform_attn(*small_inputs(requires_grad=False))  # grad mode on, but nothing needs a grad
    with torch.inference_mode():
        ms_deform_attn(*small_inputs())
    with msda_impl("auto"):
        ms_deform_attn(*small_inputs(requires_grad=True))
    assert spies == [train, "gather", "gather", "gather", train]


def test_auto_tells_training_from_inference(spies, monkeypatch):
    """With a training choice other than gather, "auto" switches on whether a gradient is needed."""
    monkeypatch.setitem(msda._AUTO_TRAIN_IMPL, "cpu", "grid_sample")
    value, spatial_shapes, loc, weights = small_inputs()
    ms_deform_attn(value, spatial_shapes, loc, weights)
    ms_deform_attn(value, spatial_shapes, loc.requires_grad_(), weights)  # only the locations
    with torch.no_grad():
        ms_deform_attn(value, spatial_shapes, loc, weights)
    ms_deform_attn(value, spatial_shapes, loc.detach(), weights.requires_grad_())
    assert spies == ["gather", "grid_sample", "gather", "grid_sample"]


def test_auto_picks_grid_sample_when_exporting(spies, monkeypatch):
    inputs = small_inputs()
    with torch.no_grad():
        with monkeypatch.context() as patch:
            patch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
            ms_deform_attn(*inputs)
        ms_deform_attn(*inputs)
    assert spies == ["grid_sample", "gather"]

    # a real TorchScript trace, under no_grad where "auto" would otherwise gather
    spies.clear()
    value, spatial_shapes, loc, weights = inputs
    with torch.no_grad(), pytest.warns(torch.jit.TracerWarning):
        torch.jit.trace(lambda v, lo, w: ms_deform_attn(v, spatial_shapes, lo, w), (value, loc, weights),
                        check_trace=False)
    assert spies == ["grid_sample"]


def test_msda_impl_nests_and_restores():
    assert current_msda_impl() == "auto"
    with msda_impl("gather"):
        with msda_impl("grid_sample"):
            assert current_msda_impl() == "grid_sample"
        assert current_msda_impl() == "gather"
        with pytest.raises(RuntimeError), msda_impl("auto"):
            assert current_msda_impl() == "auto"
            raise RuntimeError("left by an exception")
        assert current_msda_impl() == "gather"
        seen = []
        thread = threading.Thread(target=lambda: seen.append(current_msda_impl()))
        thread.start()
        thread.join()
        assert seen == ["auto"]  # a context variable: other threads keep their own choice
    assert current_msda_impl() == "auto"


def test_unknown_impl_raises():
    assert IMPLS == ("auto", "grid_sample", "gather")
    with pytest.raises(ValueError, match="unknown MSDA implementation"):
        msda_impl("cuda")
    with pytest.raises(ValueError, match="unknown MSDA implementation"):
        ms_deform_attn(*small_inputs(), impl="gridsample")
    assert current_msda_impl() == "auto"


# --------------------------------------------------------------------------- precision


def decoder_and_input(h, w, randomise_offsets, seed=0):
    """A seeded small decoder whose input projection (12 -> 32 channels, a conv) makes the map
    bf16 under autocast, as the backbone features would."""
    torch.manual_seed(seed)
    dec = DeformableDecoder(12, 10, channels=32, num_layers=2, num_heads=4, num_points=4,
                            ffn_channels=64, time_channels=8).eval()
    if randomise_offsets:
        with torch.no_grad():
            for layer in dec.layers:
                layer.attn.sampling_offsets.weight.normal_(0, 0.05)
                layer.attn.attention_weights.weight.normal_(0, 0.1)
    return dec, torch.randn(2, 12, h, w), torch.randn(2, 8)


def test_autocast_sampling_locations_stay_float32(monkeypatch):
    """Under bf16 autocast the locations reaching ms_deform_attn are float32 and equal fp32's.

    At init the offset projection's weight is zero, so the offsets are its bias (small integers
    and 0, exact in bf16) and the only way the locations can differ is the precision they are
    built in. A bf16 location on this 40-wide map would be off by up to ~1e-3 (0.04 pixel).
    """
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = msda.ms_deform_attn

    def spy(value, spatial_shapes, locations, weights, impl=None):
        seen.append((locations.detach().clone(), weights.detach().clone()))
        return real(value, spatial_shapes, locations, weights, impl)

    monkeypatch.setattr(msda, "ms_deform_attn", spy)
    dec, x, t = decoder_and_input(24, 40, randomise_offsets=False)
    with torch.no_grad():
        dec(x, t)
        fp32 = list(seen)
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = dec(x, t)
    assert out.dtype == torch.bfloat16  # it did run in bf16
    assert len(seen) == len(fp32) == 2
    for (loc, weights), (loc32, _) in zip(seen, fp32):
        assert loc.dtype == torch.float32 and weights.dtype == torch.float32
        torch.testing.assert_close(loc, loc32, rtol=0, atol=1e-6)


def test_msdeformattn_float64_keeps_float64_locations(monkeypatch):
    seen = []
    real = msda.ms_deform_attn
    monkeypatch.setattr(msda, "ms_deform_attn", lambda v, s, lo, w, impl=None: (
        seen.append((v.dtype, lo.dtype, w.dtype)), real(v, s, lo, w, impl))[1])
    attn = MSDeformAttn(embed_dims=8, num_heads=2, num_levels=1, num_points=2).double()
    query = torch.randn(1, 6, 8, dtype=torch.float64)
    attn(query, query, torch.rand(1, 6, 1, 2, dtype=torch.float64), torch.tensor([[2, 3]]))
    assert seen == [(torch.float64,) * 3]


@pytest.mark.parametrize("impl", ["gather", "grid_sample"])
def test_autocast_argmax_agrees_with_float32(impl):
    """A seeded random decoder (random offset and attention projections) on a 16x128 map:
    the per-pixel argmax under bf16 autocast agrees with fp32 on >= 97% of pixels.

    Measured: ~99% (98.9-99.4% over 3 seeds); with bf16 reference points (the bug) 92-94%.
    """
    dec, x, t = decoder_and_input(16, 128, randomise_offsets=True)
    with torch.no_grad(), msda_impl(impl):
        ref = dec(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = dec(x, t)
    agree = (ref.argmax(1) == low.argmax(1)).float().mean().item()
    assert agree >= 0.97, agree


@pytest.mark.parametrize("core", sorted(CORES))
def test_nan_location_gives_nan_not_an_index_error(core):
    value = torch.randn(1, 6, 1, 2, generator=torch.Generator().manual_seed(6))
    loc = torch.tensor([(0.5, 0.5), (math.nan, 0.5)]).view(1, 2, 1, 1, 1, 2)
    out = CORES[core](value, torch.tensor([[2, 3]]), loc, torch.ones(1, 2, 1, 1, 1))
    assert torch.isfinite(out[0, 0]).all() and torch.isnan(out[0, 1]).all()


def test_both_cores_export_to_onnx_and_match(tmp_path):
    """The gather exports as Gather + MatMul (Pad for the border), GridSample as itself; both
    graphs give the eager result (onnxruntime, if installed)."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    shapes = torch.tensor([[5, 7], [3, 4]])
    value = torch.randn(2, 47, 2, 4)
    loc = torch.rand(2, 6, 2, 2, 3, 2) * 1.4 - 0.2
    weights = torch.rand(2, 6, 2, 2, 3)
    ref = ms_deform_attn_gather(value, shapes, loc, weights)

    class Core(torch.nn.Module):
        def __init__(self, impl):
            super().__init__()
            self.impl = impl

        def forward(self, v, sl, a):
            return msda.ms_deform_attn(v, shapes, sl, a, impl=self.impl)

    for impl in ("gather", "grid_sample"):
        path = tmp_path / f"{impl}.onnx"
        torch.onnx.export(Core(impl), (value, loc, weights), str(path), dynamo=False,
                          opset_version=17, input_names=["v", "l", "a"], output_names=["o"])
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {"v": value.numpy(), "l": loc.numpy(), "a": weights.numpy()}
        got = sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})[0]
        assert {i.name for i in sess.get_inputs()} == {"v", "l", "a"}  # value not baked in
        torch.testing.assert_close(torch.from_numpy(got), ref, atol=1e-5, rtol=1e-5)
