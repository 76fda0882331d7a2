"""Deformable attention and DDP's deformable map decoder.

``ms_deform_attn`` is checked against a hand-written bilinear reference (values and gradients);
the modules against mmcv's init, the residual convention, the sine encoding formula, the
FiLM semantics and the official parameter count.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from densediff.decoders.deformable import (
    DeformableDecoder,
    DeformableLayer,
    SinePositionalEncoding,
    pixel_centres,
)
from densediff.decoders.msda import MSDeformAttn, ms_deform_attn
from densediff.testing.reference import naive_ms_deform_attn


def _random_inputs(shapes, batch=2, queries=3, heads=2, dims=3, points=2, low=-0.3, high=1.3):
    """float64 inputs with locations partly outside [0, 1] (some fully outside the map)."""
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    s = int(spatial_shapes.prod(1).sum())
    levels = len(shapes)
    value = torch.randn(batch, s, heads, dims, dtype=torch.float64)
    locations = torch.empty(batch, queries, heads, levels, points, 2, dtype=torch.float64).uniform_(low, high)
    weights = torch.randn(batch, queries, heads, levels * points, dtype=torch.float64).softmax(-1)
    return value, spatial_shapes, locations, weights.view(batch, queries, heads, levels, points)


# --------------------------------------------------------------------------- ms_deform_attn


@pytest.mark.parametrize("shapes", [[(4, 5)], [(4, 6), (3, 2)]])
def test_ms_deform_attn_matches_naive_values_and_grads(shapes):
    value, spatial_shapes, locations, weights = _random_inputs(shapes)
    assert ((locations < 0) | (locations > 1)).any()
    inputs = [t.requires_grad_() for t in (value, locations, weights)]

    fast = ms_deform_attn(value, spatial_shapes, locations, weights)
    slow = naive_ms_deform_attn(value, spatial_shapes, locations, weights)
    assert fast.shape == (2, 3, 2 * 3)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)

    upstream = torch.randn_like(fast)
    grads_fast = torch.autograd.grad(fast, inputs, upstream)
    grads_slow = torch.autograd.grad(slow, inputs, upstream)
    for name, g_fast, g_slow in zip(("value", "locations", "weights"), grads_fast, grads_slow):
        torch.testing.assert_close(g_fast, g_slow, rtol=1e-10, atol=1e-12, msg=name)


def test_ms_deform_attn_exact_pixel_centre_and_outside():
    # a 2x3 map with one head of one channel; weight 1 on a single point
    value = torch.arange(6, dtype=torch.float64).view(1, 6, 1, 1)
    shapes = torch.tensor([[2, 3]])
    weights = torch.ones(1, 2, 1, 1, 1, dtype=torch.float64)
    locations = torch.tensor([[(2.5 / 3, 1.5 / 2)], [(2.0, 2.0)]], dtype=torch.float64)
    out = ms_deform_attn(value, shapes, locations.view(1, 2, 1, 1, 1, 2), weights)
    # the centre of pixel (1, 2) reads that pixel; a location far outside reads zero
    torch.testing.assert_close(out.flatten(), torch.tensor([5.0, 0.0], dtype=torch.float64))


def test_ms_deform_attn_gradcheck():
    value, spatial_shapes, locations, weights = _random_inputs(
        [(2, 3), (1, 2)], batch=1, queries=2, heads=2, dims=2, points=2, low=0.05, high=0.95)
    inputs = tuple(t.requires_grad_() for t in (value, locations, weights))
    assert torch.autograd.gradcheck(lambda v, loc, w: ms_deform_attn(v, spatial_shapes, loc, w), inputs)


def test_ms_deform_attn_rejects_wrong_shapes():
    value, _, locations, weights = _random_inputs([(4, 5)])
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn(value, torch.tensor([[4, 4]]), locations, weights)


# --------------------------------------------------------------------------- MSDeformAttn


def test_msdeformattn_shape_and_residual():
    attn = MSDeformAttn(embed_dims=16, num_heads=4, num_levels=2, num_points=3)
    shapes = torch.tensor([[3, 4], [2, 2]])
    query, query_pos = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    value = torch.randn(2, 16, 16)
    ref = torch.rand(2, 5, 2, 2)
    assert attn(query, value, ref, shapes, query_pos).shape == (2, 5, 16)

    # the identity is added inside the attention, and it is the query without query_pos
    nn.init.zeros_(attn.output_proj.weight)
    nn.init.zeros_(attn.output_proj.bias)
    torch.testing.assert_close(attn(query, value, ref, shapes, query_pos), query, rtol=0, atol=0)


def test_msdeformattn_init_follows_mmcv_grid():
    heads, levels, points = 8, 2, 3
    attn = MSDeformAttn(embed_dims=32, num_heads=heads, num_levels=levels, num_points=points)
    # head m points at angle 2*pi*m/8, scaled to the unit square: the 8 neighbours of a pixel
    directions = torch.tensor([(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)],
                              dtype=torch.float32)
    bias = attn.sampling_offsets.bias.view(heads, levels, points, 2)
    for m in range(heads):
        for lvl in range(levels):
            for p in range(points):
                torch.testing.assert_close(bias[m, lvl, p], directions[m] * (p + 1), atol=1e-6, rtol=0)
    assert not attn.sampling_offsets.weight.any()
    assert not attn.attention_weights.weight.any() and not attn.attention_weights.bias.any()
    for proj in (attn.value_proj, attn.output_proj):
        assert not proj.bias.any()
        bound = math.sqrt(6 / (proj.in_features + proj.out_features))
        assert proj.weight.abs().max() <= bound and proj.weight.std() > bound / 4


def test_msdeformattn_samples_the_ring_around_the_reference_point():
    """At init, each head averages its ring of points (offsets in pixels of each level)."""
    heads, levels, points = 8, 2, 2
    attn = MSDeformAttn(embed_dims=8, num_heads=heads, num_levels=levels, num_points=points).double()
    with torch.no_grad():  # identity projections: the output is the raw sampled values
        for proj in (attn.value_proj, attn.output_proj):
            proj.weight.copy_(torch.eye(8))
    shapes = torch.tensor([[4, 6], [2, 3]])
    query = torch.randn(1, 3, 8, dtype=torch.float64)
    value = torch.randn(1, 30, 8, dtype=torch.float64)
    ref = torch.rand(1, 3, levels, 2, dtype=torch.float64)

    offsets = attn.sampling_offsets.bias.detach().view(heads, levels, points, 2)
    size_xy = torch.tensor([[6.0, 4.0], [3.0, 2.0]], dtype=torch.float64)  # (W, H) per level
    locations = ref[:, :, None, :, None, :] + offsets[None, None] / size_xy[None, None, None, :, None, :]
    uniform = torch.full((1, 3, heads, levels, points), 1 / (levels * points), dtype=torch.float64)
    expected = query + naive_ms_deform_attn(value.view(1, 30, heads, 1), shapes, locations, uniform)
    torch.testing.assert_close(attn(query, value, ref, shapes), expected)


# --------------------------------------------------------------------------- positional encoding


def test_sine_positional_encoding_by_hand():
    pe = SinePositionalEncoding(num_feats=4)
    pos = pe(2, 3, 5, "cpu", torch.float64)
    assert pos.shape == (2, 8, 3, 5)
    i, j = 1, 3
    y = (i + 0.5) / (3 + 1e-6) * 2 * math.pi
    x = (j + 0.5) / (5 + 1e-6) * 2 * math.pi
    # dim_t = 10000 ** (2 * (k // 2) / 4) = [1, 1, 100, 100]; y channels first, then x
    expected = [math.sin(y), math.cos(y), math.sin(y / 100), math.cos(y / 100),
                math.sin(x), math.cos(x), math.sin(x / 100), math.cos(x / 100)]
    torch.testing.assert_close(pos[1, :, i, j], torch.tensor(expected, dtype=torch.float64))
    # the tensor form reads batch, size, device and dtype from the map
    torch.testing.assert_close(pe(torch.zeros(2, 7, 3, 5, dtype=torch.float64)), pos)


def test_pixel_centres():
    ref = pixel_centres(2, 4)
    assert ref.shape == (8, 2)
    torch.testing.assert_close(ref[5], torch.tensor([1.5 / 4, 1.5 / 2]))  # row 1, column 1


# --------------------------------------------------------------------------- decoder

SMALL = dict(channels=16, num_layers=2, num_heads=4, num_points=2, ffn_channels=32)


@pytest.mark.parametrize("num_levels", [1, 3])
@pytest.mark.parametrize("in_channels", [16, 12])
def test_decoder_shape_odd_size(num_levels, in_channels):
    dec = DeformableDecoder(in_channels, 5, num_levels=num_levels, **SMALL)
    assert dec(torch.randn(2, in_channels, 7, 9)).shape == (2, 5, 7, 9)
    assert isinstance(dec.input_proj, nn.Identity) == (in_channels == 16)
    assert (dec.level_embed is None) == (num_levels == 1)
    if num_levels == 3:
        assert dec.level_shapes(7, 9) == [(7, 9), (4, 5), (2, 3)]


def test_decoder_init_order():
    dec = DeformableDecoder(16, 5, dropout=0.1, **SMALL)
    assert isinstance(dec.dropout, nn.Dropout2d)
    bound = math.sqrt(6 / (16 + 5))  # xavier on the 1x1 conv_seg (fan_in 16, fan_out 5)
    assert dec.conv_seg.weight.abs().max() <= bound and dec.conv_seg.weight.std() > bound / 4
    for layer in dec.layers:  # MSDA init runs after the blanket xavier init
        assert not layer.attn.sampling_offsets.weight.any()
        assert not layer.attn.attention_weights.weight.any()


def test_decoder_film():
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64)
    film = DeformableDecoder(16, 5, time_channels=6, **SMALL).double()
    t1, t2 = torch.randn(2, 2, 6, dtype=torch.float64)
    assert not torch.allclose(film(x, t1), film(x, t2))
    with pytest.raises(ValueError, match="time_emb"):
        film(x)

    twin = DeformableDecoder(16, 5, time_channels=None, **SMALL).double()
    result = twin.load_state_dict(film.state_dict(), strict=False)
    assert not result.missing_keys
    assert result.unexpected_keys and all(".time_mlp." in k for k in result.unexpected_keys)
    with torch.no_grad():
        for layer in film.layers:
            layer.time_mlp[1].weight.zero_()
            layer.time_mlp[1].bias.zero_()
    torch.testing.assert_close(film(x, t1), twin(x), rtol=0, atol=0)


@pytest.mark.parametrize("num_levels", [1, 3])
def test_decoder_gradients_reach_every_parameter(num_levels):
    dec = DeformableDecoder(12, 5, num_levels=num_levels, time_channels=6, **SMALL)
    out = dec(torch.randn(2, 12, 7, 9), torch.randn(2, 6))
    out.square().mean().backward()
    for name, p in dec.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_layer_film_is_applied_after_the_post_norm():
    layer = DeformableLayer(8, 2, 2, 1, 16, time_channels=4)
    with torch.no_grad():
        layer.time_mlp[1].weight.zero_()
        layer.time_mlp[1].bias.copy_(torch.tensor([1.0] * 8 + [0.5] * 8))  # scale 1, shift 0.5
    query = torch.randn(1, 12, 8)
    ref = pixel_centres(3, 4)[None, :, None]
    shapes = torch.tensor([[3, 4]])
    out = layer(query, None, ref, shapes, time_emb=torch.zeros(1, 4))
    # LayerNorm output (weight 1, bias 0) has zero mean over channels: after x*2 + 0.5, mean 0.5
    torch.testing.assert_close(out.mean(-1), torch.full((1, 12), 0.5), atol=1e-5, rtol=0)


def test_official_config_parameter_count():
    c, ffn, heads, levels, points, layers, classes, time = 256, 1024, 8, 1, 4, 6, 150, 1024
    dec = DeformableDecoder(256, classes, channels=c, num_layers=layers, num_heads=heads,
                            num_points=points, num_levels=levels, ffn_channels=ffn, time_channels=time)

    def linear(i, o):
        return i * o + o

    samples = heads * levels * points
    attention = linear(c, 2 * samples) + linear(c, samples) + 2 * linear(c, c)
    norms = 2 * 2 * c
    feed_forward = linear(c, ffn) + linear(ffn, c)
    time_mlp = linear(time, 2 * c)
    per_layer = attention + norms + feed_forward + time_mlp
    expected = layers * per_layer + linear(c, classes)  # conv_seg; no input projection
    assert sum(p.numel() for p in dec.parameters()) == expected
