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
    sample_ddim,
    sample_ddpm,
    sampling_times,
)
from densediff.diffusion.noise import add_noise, generators, seeded_normal
from densediff.diffusion.samplers import SAMPLERS, sample_map
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


def _steps(sampler, denoise, x_T, steps, **kw) -> list[torch.Tensor]:
    """Every prediction of ``sampler`` (through its callback)."""
    seen = []
    last = sampler(denoise, x_T, cosine_log_snr, steps,
                   callback=lambda s, pred: seen.append((s, pred)), **kw)
    assert [s for s, _ in seen] == list(range(steps)) and last is seen[-1][1]
    return [p for _, p in seen]


def test_sample_loop_calls_the_decoder_at_the_algorithm_2_times():
    calls = []

    def denoise(x, ls, x0_prev):
        calls.append((x.clone(), ls.clone(), x0_prev))
        return torch.zeros_like(x), torch.zeros_like(x)

    x_T = torch.randn(2, 3, 4, 4)
    preds = _steps(sample_ddim, denoise, x_T, 3, td=1)
    assert len(preds) == 3 and len(calls) == 3
    for (_, ls, x0_prev), (t_now, _) in zip(calls, sampling_times(3, 1)):
        assert ls.shape == (2,) and x0_prev is None  # no self-conditioning
        assert torch.allclose(ls, cosine_log_snr(torch.full((2,), t_now)))
    assert torch.equal(calls[0][0], x_T)
    # x0 = 0 predicted: DDIM keeps the noise direction, x_next = sigma_next / sigma_now * x_t
    _, s_now = alpha_sigma(cosine_log_snr(torch.tensor(1.0)))
    _, s_next = alpha_sigma(cosine_log_snr(torch.tensor(1 / 3)))
    assert torch.allclose(calls[1][0], x_T * s_next / s_now, atol=1e-6)


def _perfect(x0: torch.Tensor):
    """A denoiser that predicts ``x0`` exactly, whatever its input."""
    return lambda x, ls, x0_prev: (x0, x0)


def test_ddim_with_a_perfect_predictor_lands_on_x0_along_the_same_noise():
    """Closed form of DDIM (Alg. 3, eta = 0) with x0_hat = x0: x_t stays on the line
    alpha_t x0 + sigma_t eps of the starting noise, and t_next = 0 is x0 itself."""
    g = torch.Generator().manual_seed(0)
    x0, eps = (torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    a1, s1 = alpha_sigma(_ls(1.0))
    x_T = a1 * x0 + s1 * eps
    seen = []

    def denoise(x, ls, x0_prev):
        seen.append(x)
        return x0, x0

    sample_ddim(denoise, x_T, lambda t: cosine_log_snr(t.double()), 4, td=0)
    for x, (t_now, _) in zip(seen, sampling_times(4, 0)):
        a, s = alpha_sigma(_ls(t_now))
        assert torch.allclose(x, a * x0 + s * eps)
    assert torch.allclose(ddim_step(seen[-1], x0, _ls(0.25), _ls(0.0)), x0, atol=1e-2)


def test_ddpm_sampler_updates_are_the_gaussian_posterior_with_the_supplied_noise():
    """The ancestral sampler's x_next is ddpm_step's posterior mean plus its standard deviation
    times the supplied noise (none drawn for t_next = 0 or after the last call)."""
    x0 = torch.full((1, 2, 3, 3), 0.5, dtype=torch.float64)
    z = torch.full((1, 2, 3, 3), 0.25, dtype=torch.float64)
    drawn, seen = [], []

    def noise(shape):
        drawn.append(tuple(shape))
        return z

    def denoise(x, ls, x0_prev):
        seen.append(x)
        return x0, x0

    x_T = torch.ones(1, 2, 3, 3, dtype=torch.float64)
    sched = lambda t: cosine_log_snr(t.double())  # noqa: E731
    sample_ddpm(denoise, x_T, sched, 4, td=0, noise=noise)  # updates to .75, .5, .25
    assert drawn == [(1, 2, 3, 3)] * 3 and len(seen) == 4
    for k, (t_now, t_next) in enumerate(sampling_times(4, 0)[:3]):
        assert torch.allclose(seen[k + 1], ddpm_step(seen[k], x0, _ls(t_now), _ls(t_next), z))
    drawn.clear()
    # T = 3, td = 1: updates 1 -> 1/3 (noise) and 2/3 -> 0 (none); the last step only predicts
    sample_ddpm(_perfect(x0), x_T, sched, 3, td=1, noise=noise)
    assert len(drawn) == 1


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_self_conditioning_feeds_each_estimate_to_the_next_call(name):
    estimates, received = [], []

    def denoise(x, ls, x0_prev):
        received.append(x0_prev)
        estimates.append(torch.randn_like(x))
        return x, estimates[-1]

    SAMPLERS[name](denoise, torch.randn(1, 2, 3, 3), cosine_log_snr, 3, self_condition=True)
    assert received[0] is None and received[1:] == estimates[:2]


def test_the_config_names_exactly_the_sampler_table():
    import typing

    from densediff.config import DiffusionConfig

    names = typing.get_args(DiffusionConfig.model_fields["sampler"].annotation)
    assert set(names) == set(SAMPLERS)


def test_sample_map_reports_per_image_steps_and_refuses_unknown_samplers():
    feat = torch.randn(2, 4, 3, 3)
    calls = []

    def denoise_step(f, x, ls, x0_prev):
        calls.append(f)
        return x[:, :1] * 0 + 1, x

    seen = []
    last = sample_map(denoise_step, feat, 2, cosine_log_snr, 2, randsteps=3, seeds=[1, 2],
                      callback=lambda s, p: seen.append(p))
    assert torch.equal(calls[0], feat.repeat_interleave(3, 0))  # image-major starts
    assert [p.shape for p in seen] == [(2, 3, 1, 3, 3)] * 2 and torch.equal(last, seen[-1])
    with pytest.raises(ValueError, match="sampler 'euler'"):
        sample_map(denoise_step, feat, 2, cosine_log_snr, 2, sampler="euler")
    with pytest.raises(ValueError, match="3 seeds for a batch of 2"):
        sample_map(denoise_step, feat, 2, cosine_log_snr, 2, seeds=[1, 2, 3])


def test_add_noise_is_the_forward_process():
    g = torch.Generator().manual_seed(2)
    y0, eps = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(2))
    ls = cosine_log_snr(torch.tensor([0.2, 0.9]))
    a, s = alpha_sigma(ls)
    y_t = add_noise(y0, ls, eps)
    for i in range(2):
        assert torch.allclose(y_t[i], a[i] * y0[i] + s[i] * eps[i])


def test_seeded_normal_is_per_item():
    g = generators([3, 4], "cpu")
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
