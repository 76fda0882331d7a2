"""Schedules, samplers and map encodings against their formulas (DDP Alg. 1-3, App. A)."""

from __future__ import annotations

import math

import pytest
import torch

from densediff.diffusion import (
    AnalogBits,
    ClassEmbedding,
    OneHot,
    alpha_sigma,
    cosine_log_snr,
    ddim_step,
    ddpm_step,
    linear_log_snr,
    sample,
    sampling_times,
)
from densediff.diffusion.samplers import seeded_normal
from densediff.diffusion.schedules import LearnedSinusoidalPosEmb, TimeEmbedding, get_schedule

# The table of the official-implementation notes, section 1.4 (computed from the formula).
SCHEDULE_TABLE = [  # t, log_snr, alpha, sigma
    (0.0, 11.513, 0.999995, 0.00316),
    (1 / 3, 1.098, 0.866, 0.500),
    (0.5, -0.0005, 0.707, 0.707),
    (2 / 3, -1.099, 0.500, 0.866),
    (0.999, -12.82, 0.00165, 1.0),
    (1.0, -18.90, 7.9e-5, 1.0),
]


@pytest.mark.parametrize("t, log_snr, alpha, sigma", SCHEDULE_TABLE)
def test_cosine_schedule_matches_the_official_table(t, log_snr, alpha, sigma):
    ls = cosine_log_snr(torch.tensor([t], dtype=torch.float64))
    a, s = alpha_sigma(ls)
    assert float(ls) == pytest.approx(log_snr, abs=2e-3 + 1e-3 * abs(log_snr))
    assert float(a) == pytest.approx(alpha, rel=2e-2, abs=1e-5)
    assert float(s) == pytest.approx(sigma, rel=2e-2, abs=1e-5)


def test_cosine_schedule_is_the_clamped_formula_and_alpha_sigma_are_unit():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    ns, ds = 0.0002, 0.00025
    ref = -torch.log(torch.clamp(torch.cos((t + ns) / (1 + ds) * math.pi / 2) ** -2 - 1, min=1e-5))
    assert torch.allclose(cosine_log_snr(t), ref)
    assert float(cosine_log_snr(t).max()) == pytest.approx(-math.log(1e-5))
    a, s = alpha_sigma(cosine_log_snr(t))
    assert torch.allclose(a**2 + s**2, torch.ones_like(t))
    assert torch.all(a[1:] <= a[:-1])  # monotonically decreasing signal
    # away from the clamp, alpha^2 = cos^2((t + ns) / (1 + ds) * pi / 2)
    mid = (t > 0.05) & (t < 0.95)
    assert torch.allclose(a[mid] ** 2, torch.cos((t[mid] + ns) / (1 + ds) * math.pi / 2) ** 2)


def test_linear_schedule_formula_and_lookup():
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    ref = torch.tensor([-math.log(math.expm1(1e-4 + 10 * v * v)) for v in t.tolist()],
                       dtype=torch.float64)
    assert torch.allclose(linear_log_snr(t), ref)
    assert get_schedule("linear") is linear_log_snr and get_schedule("cosine") is cosine_log_snr
    with pytest.raises(ValueError, match="unknown noise schedule"):
        get_schedule("sqrt")


def test_sampling_times_with_time_difference():
    def flat(pairs):
        return [v for pair in pairs for v in pair]

    assert flat(sampling_times(3, td=1)) == pytest.approx(flat([(1, 1 / 3), (2 / 3, 0), (1 / 3, 0)]))
    assert flat(sampling_times(4, td=0)) == pytest.approx(
        flat([(1, .75), (.75, .5), (.5, .25), (.25, 0)]))
    assert sampling_times(1) == [(1.0, 0.0)]
    with pytest.raises(ValueError):
        sampling_times(0)


def _ls(t: float) -> torch.Tensor:
    return cosine_log_snr(torch.tensor(t, dtype=torch.float64))


def test_ddim_step_moves_along_the_same_noise():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    a, s = alpha_sigma(_ls(0.8))
    a2, s2 = alpha_sigma(_ls(0.3))
    x_t = a * x0 + s * eps
    assert torch.allclose(ddim_step(x_t, x0, _ls(0.8), _ls(0.3)), a2 * x0 + s2 * eps)
    # t_next = 0: (almost) the clean map
    assert torch.allclose(ddim_step(x_t, x0, _ls(0.8), _ls(0.0)), x0, atol=1e-2)


def test_ddpm_step_is_the_gaussian_posterior():
    """Mean/variance of q(x_s | x_t, x_0) (Kingma et al. 2021, eq. 32-33), written with
    alpha_{t|s} = alpha_t / alpha_s and sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2."""
    g = torch.Generator().manual_seed(1)
    x0, x_t, z = (torch.randn(5, generator=g, dtype=torch.float64) for _ in range(3))
    ls_t, ls_s = _ls(0.7), _ls(0.4)
    (a_t, s_t), (a_s, s_s) = alpha_sigma(ls_t), alpha_sigma(ls_s)
    a_ts = a_t / a_s
    var_ts = s_t**2 - a_ts**2 * s_s**2
    mean = a_ts * s_s**2 / s_t**2 * x_t + a_s * var_ts / s_t**2 * x0
    var = var_ts * s_s**2 / s_t**2
    assert torch.allclose(ddpm_step(x_t, x0, ls_t, ls_s, None), mean)
    assert torch.allclose(ddpm_step(x_t, x0, ls_t, ls_s, z), mean + var.sqrt() * z)


def test_sample_loop_calls_the_decoder_at_the_algorithm_2_times():
    calls = []

    def denoise(x, ls):
        calls.append((x.clone(), ls.clone()))
        return torch.zeros_like(x)

    x_T = torch.randn(2, 3, 4, 4)
    preds = sample(denoise, lambda p: p, x_T, cosine_log_snr, steps=3, td=1)
    assert len(preds) == 3 and len(calls) == 3
    for (_, ls), (t_now, _) in zip(calls, sampling_times(3, 1)):
        assert ls.shape == (2,)
        assert torch.allclose(ls, cosine_log_snr(torch.full((2,), t_now)))
    assert torch.equal(calls[0][0], x_T)
    # x0 = 0 predicted: DDIM keeps the noise direction, x_next = sigma_next / sigma_now * x_t
    _, s_now = alpha_sigma(cosine_log_snr(torch.tensor(1.0)))
    _, s_next = alpha_sigma(cosine_log_snr(torch.tensor(1 / 3)))
    assert torch.allclose(calls[1][0], x_T * s_next / s_now, atol=1e-6)
    with pytest.raises(ValueError, match="sampler"):
        sample(denoise, lambda p: p, x_T, cosine_log_snr, steps=2, sampler="euler")


def test_ddpm_sampling_uses_the_supplied_noise_except_at_t0():
    drawn = []

    def noise():
        drawn.append(1)
        return torch.zeros(1, 2, 3, 3)

    # T = 3, td = 1: updates 1 -> 1/3 (noise) and 2/3 -> 0 (none); the last step only predicts
    sample(lambda x, ls: x, lambda p: p, torch.randn(1, 2, 3, 3), cosine_log_snr, steps=3, td=1,
           sampler="ddpm", noise=noise)
    assert len(drawn) == 1
    drawn.clear()
    # T = 4, td = 0: updates to .75, .5, .25 all draw noise
    sample(lambda x, ls: x, lambda p: p, torch.randn(1, 2, 3, 3), cosine_log_snr, steps=4, td=0,
           sampler="ddpm", noise=noise)
    assert len(drawn) == 3


def test_seeded_normal_is_per_item():
    g = [torch.Generator().manual_seed(s) for s in (3, 4)]
    both = seeded_normal((4, 2, 3), g, "cpu")  # two rows per generator
    one = seeded_normal((2, 2, 3), [torch.Generator().manual_seed(4)], "cpu")
    assert torch.equal(both[2:], one)
    with pytest.raises(ValueError):
        seeded_normal((3, 2), g, "cpu")


def test_class_embedding_range_and_ignore_row():
    enc = ClassEmbedding(5, channels=8, scale=0.01, ignore_index=255)
    labels = torch.tensor([[[0, 4], [255, 7]]])
    y = enc(labels)
    assert y.shape == (1, 8, 2, 2)
    assert float(y.detach().abs().max()) < 0.01
    ref = (enc.embedding.weight[5].sigmoid() * 2 - 1) * 0.01
    assert torch.allclose(y[0, :, 1, 0], ref)  # ignore -> row K
    assert torch.allclose(y[0, :, 1, 1], ref)  # out of range -> row K too
    assert torch.allclose(y[0, :, 0, 1], (enc.embedding.weight[4].sigmoid() * 2 - 1) * 0.01)


def test_onehot_round_trip():
    enc = OneHot(4, scale=0.1)
    labels = torch.tensor([[[0, 1], [3, 255]]])
    y = enc(labels)
    assert tuple(y.shape) == (1, 4, 2, 2)
    assert torch.allclose(y.abs(), torch.full_like(y, 0.1))
    assert torch.equal(y.argmax(1)[0, :, :][labels[0] != 255], labels[0][labels[0] != 255])
    assert torch.all(y[0, :, 1, 1] < 0)  # ignore: all channels off


@pytest.mark.parametrize("k", [1, 2, 7, 8, 150])
def test_analog_bits_round_trip(k):
    enc = AnalogBits(k, scale=0.1)
    assert enc.channels == max(1, math.ceil(math.log2(k + 1)))
    labels = torch.arange(k).view(1, 1, k)
    y = enc(labels)
    assert torch.allclose(y.abs(), torch.full_like(y, 0.1))
    assert torch.equal(enc.decode(y), labels)
    assert torch.equal(enc.decode(enc(torch.full((1, 1, 1), 255))), torch.full((1, 1, 1), k))
    if k == 7:  # 5 = 101b, most significant bit first
        assert enc(torch.full((1, 1, 1), 5))[0, :, 0, 0].tolist() == pytest.approx([.1, -.1, .1])


def test_time_embedding_formula():
    emb = LearnedSinusoidalPosEmb(4)
    x = torch.tensor([0.5, -2.0])
    out = emb(x)
    w = emb.weights.detach()
    ref = torch.cat([x[:, None], torch.sin(2 * math.pi * x[:, None] * w),
                     torch.cos(2 * math.pi * x[:, None] * w)], 1)
    assert torch.allclose(out, ref)
    mlp = TimeEmbedding(16, 64)
    assert mlp(torch.randn(3)).shape == (3, 64)
    assert sum(p.numel() for p in mlp.parameters()) == 8 + (17 * 64 + 64) + (64 * 64 + 64)
