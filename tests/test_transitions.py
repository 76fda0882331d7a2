"""Discrete diffusion (DDPS App. A Eq. 1-3): schedules, transition matrices, closed forms against
repeated one-step products, the posterior against brute-force Bayes, stride times, sampling."""

from __future__ import annotations

import itertools

import pytest
import torch

from densediff.diffusion.transitions import (
    DiscreteTransition,
    alpha_bar_schedule,
    sample_categorical,
    stride_times,
)

KINDS = ["uniform", "absorbing", "hybrid"]


def test_linear_schedule_matches_the_official_values():
    ab = alpha_bar_schedule("linear", 20).double()
    assert ab[0] == 1.0  # t = 0: no noise (the official appended entry)
    assert ab[1] == pytest.approx(0.99999) and ab[20] == pytest.approx(0.000009)
    # official index i = our t - 1: abar[1] = 0.947 and abar[10] ~ 0.47 for T = 20
    assert ab[2] == pytest.approx(0.99999 - (0.99999 - 0.000009) / 19, abs=1e-6)
    assert ab[2] == pytest.approx(0.947, abs=1e-3) and ab[11] == pytest.approx(0.4737, abs=1e-3)


def test_cosine_schedule_is_decreasing_within_the_official_range():
    ab = alpha_bar_schedule("cosine", 50)
    assert ab[0] == 1.0
    assert torch.all(ab[1:-1] > ab[2:])
    assert float(ab[1]) == pytest.approx(0.99999, abs=1e-6)
    assert float(ab[-1]) == pytest.approx(0.000009, abs=1e-7)
    with pytest.raises(ValueError, match="unknown discrete schedule"):
        alpha_bar_schedule("sqrt", 10)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_matrices_are_row_stochastic_and_the_closed_form_is_the_product(kind, schedule):
    tr = DiscreteTransition(4, 10, kind, schedule, mask_share=0.3)
    assert tr.num_states == (4 if kind == "uniform" else 5)
    prod = torch.eye(tr.num_states, dtype=torch.float64)
    for t in range(1, 11):
        step = tr.matrix(t - 1, t)  # Eq. 1: one step
        assert torch.all(step >= -1e-12)
        assert torch.allclose(step.sum(1), torch.ones(tr.num_states, dtype=torch.float64),
                              atol=1e-6)
        prod = prod @ step
        closed = tr.matrix(0, t)  # Eq. 2 from the cumulative coefficients
        assert torch.allclose(closed, prod, atol=1e-5), (kind, t)
    # any stride s -> t equals the product of its steps too
    strided = tr.matrix(0, 3) @ tr.matrix(3, 8)
    assert torch.allclose(strided, tr.matrix(0, 8), atol=1e-5)


def test_stationary_distributions():
    for kind, share in (("uniform", 0.0), ("absorbing", 1.0), ("hybrid", 0.4)):
        tr = DiscreteTransition(5, 20, kind, mask_share=0.4)
        prior = tr.prior_probs().double()
        assert prior.sum() == pytest.approx(1.0)
        assert torch.allclose(prior[:5], torch.full((5,), (1 - share * (1 - 9e-6)) / 5,
                                                    dtype=torch.float64), atol=1e-5)
        # q(x_T | x_0) is the prior for every class x_0 up to abar_T ~ 1e-5
        rows = tr.matrix(0, 20).float()[:5]
        assert torch.allclose(rows, prior.float().expand_as(rows), atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_apply_equals_the_explicit_matrix_product(kind):
    tr = DiscreteTransition(3, 8, kind)
    probs = torch.rand(2, tr.num_states, 4, 5).softmax(1)
    for s, t in ((0, 1), (0, 8), (2, 7)):
        expect = torch.einsum("bnhw,nm->bmhw", probs.double(), tr.matrix(s, t))
        assert torch.allclose(tr.apply(probs, s, t).double(), expect, atol=1e-6)
    # per-image times
    t = torch.tensor([2, 6])
    out = tr.apply(probs, 0, t)
    for i in range(2):
        expect = torch.einsum("nhw,nm->mhw", probs[i].double(), tr.matrix(0, int(t[i])))
        assert torch.allclose(out[i].double(), expect, atol=1e-6)


def _bayes(tr: DiscreteTransition, x_t: int, x0: int, s: int, t: int) -> torch.Tensor:
    """q(x_s | x_t, x0) by Bayes' rule with explicit matrices."""
    num = tr.matrix(0, s)[x0] * tr.matrix(s, t)[:, x_t]
    return num / num.sum()


@pytest.mark.parametrize("kind", KINDS)
def test_posterior_matches_brute_force_bayes(kind):
    k = 3
    tr = DiscreteTransition(k, 6, kind, mask_share=0.5)
    states = range(tr.num_states)
    for s, t in ((0, 1), (2, 3), (1, 5), (4, 6)):
        for x_t, x0 in itertools.product(states, range(k)):
            if tr.matrix(0, t)[x0, x_t] == 0:
                continue  # x_t impossible under x0
            got = tr.posterior(torch.tensor([[[x_t]]]), tr.one_hot(torch.tensor([[[x0]]])), s, t)
            assert torch.allclose(got[0, :, 0, 0].double(), _bayes(tr, x_t, x0, s, t),
                                  atol=1e-5), (kind, s, t, x_t, x0)


def test_posterior_with_a_predicted_distribution_is_the_average_over_x0():
    """p(x_s | x_t) = E_{x0 ~ p}[q(x_s | x_t, x0)] (paper §3.4), p being the denoiser's
    prediction given x_t; x0 for which x_t is impossible drop out (p renormalised)."""
    k = 3
    for kind in KINDS:
        tr = DiscreteTransition(k, 6, kind)
        p = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
        s, t = 2, 5
        for x_t in range(tr.num_states):
            ok = [x0 for x0 in range(k) if tr.matrix(0, t)[x0, x_t] > 0]
            expect = sum(p[x0] * _bayes(tr, x_t, x0, s, t) for x0 in ok) / p[ok].sum()
            got = tr.posterior(torch.tensor([[[x_t]]]), p.float().view(1, k, 1, 1), s, t)
            assert torch.allclose(got[0, :, 0, 0].double(), expect, atol=1e-5), (kind, x_t)


def test_posterior_to_t0_returns_the_x0_distribution():
    tr = DiscreteTransition(4, 10)
    p = torch.rand(2, 4, 3, 3).softmax(1)
    x_t = torch.randint(0, 4, (2, 3, 3))
    assert torch.allclose(tr.posterior(x_t, p, 0, 4), p, atol=1e-5)


def test_stride_times():
    assert stride_times(20, 1) == [20]
    assert stride_times(20, 2) == [20, 1]
    # the official inference_timesteps=2 with T = 20 runs noise steps [19, 9, 0] = ours - 1
    assert stride_times(20, 3) == [20, 10, 1]
    assert stride_times(100, 5) == [100, 75, 50, 26, 1]
    assert stride_times(20, 20) == list(range(20, 0, -1))
    with pytest.raises(ValueError, match="at most"):
        stride_times(20, 21)
    with pytest.raises(ValueError, match=">= 1"):
        stride_times(20, 0)


def test_categorical_sampling_follows_the_probabilities():
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.1, 0.6, 0.3, 0.0]).view(1, 4, 1, 1).expand(20000, 4, 1, 1)
    x = sample_categorical(probs, torch.rand(probs.shape, generator=g))
    freq = torch.bincount(x.flatten(), minlength=4).float() / 20000
    assert torch.allclose(freq, torch.tensor([0.1, 0.6, 0.3, 0.0]), atol=0.015)
    assert freq[3] == 0  # impossible states are never drawn


def test_forward_noise_keeps_the_expected_share_of_labels():
    tr = DiscreteTransition(10, 20, "hybrid", mask_share=0.5)
    x0 = torch.randint(0, 10, (4, 64, 64))
    q = tr.q_probs(x0, 10)
    x_t = sample_categorical(q, torch.rand(q.shape, generator=torch.Generator().manual_seed(1)))
    a, b, c = (float(v) for v in tr.coefficients(0, 10))
    assert float((x_t == x0).float().mean()) == pytest.approx(a + b / 10, abs=0.02)
    assert float((x_t == 10).float().mean()) == pytest.approx(c, abs=0.02)


# ---------------------------------------------------------------- the stride sampler (DDPS Alg. 2)


def _target_denoiser(target: torch.Tensor, k: int, seen: list):
    """A perfect denoiser: large logits on ``target`` whatever its input; records (t, flag)."""

    def denoise(x_t, t, with_uncond):
        seen.append((t.tolist(), with_uncond, x_t.shape))
        logits = torch.nn.functional.one_hot(target, k).permute(0, 3, 1, 2).float() * 30
        return torch.cat([logits, torch.zeros_like(logits)]) if with_uncond else logits

    return denoise


def _run(denoise, tr, shape, steps, **kw) -> list[torch.Tensor]:
    """Every step's logits of the stride sampler from x_T ~ q(x_T) (through its callback)."""
    from densediff.diffusion.samplers import sample_discrete, sample_prior

    seen = []
    last = sample_discrete(denoise, sample_prior(tr, shape), tr, steps,
                           callback=lambda k, logits: seen.append(logits), **kw)
    assert last is seen[-1]
    return seen


@pytest.mark.parametrize("kind,renoise", [("uniform", "free"), ("uniform", "posterior"),
                                          ("hybrid", "free"), ("absorbing", "posterior")])
def test_sample_discrete_visits_the_stride_times(kind, renoise):
    from densediff.diffusion.samplers import guided

    k, T = 4, 20
    tr = DiscreteTransition(k, T, kind)
    target = torch.randint(0, k, (2, 5, 6), generator=torch.Generator().manual_seed(0))
    seen = []
    preds = _run(guided(_target_denoiser(target, k, seen), 0.0), tr, (2, 5, 6), 3,
                 renoise=renoise)
    assert [s[0] for s in seen] == [[20, 20], [10, 10], [1, 1]]  # stride_times(20, 3)
    assert all(not s[1] and s[2] == (2, 5, 6) for s in seen)
    assert len(preds) == 3 and all(torch.equal(p.argmax(1), target) for p in preds)
    with pytest.raises(ValueError, match="re-noising"):
        _run(guided(_target_denoiser(target, k, []), 0.0), tr, (2, 5, 6), 2, renoise="bad")


def test_sample_discrete_guidance_and_seeded_noise():
    from densediff.diffusion.noise import generators, seeded_uniform
    from densediff.diffusion.samplers import classifier_free_guidance, guided

    k = 3
    tr = DiscreteTransition(k, 10)
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    seen = []
    preds = _run(guided(_target_denoiser(target, k, seen), 0.5), tr, (1, 4, 4), 2)
    assert all(s[1] for s in seen)  # one call on the doubled batch per step
    logits = _target_denoiser(target, k, [])(target, torch.ones(1), False)
    assert torch.allclose(preds[0], 1.5 * logits)  # (s + 1) l_c - s l_u with l_u = 0
    assert torch.equal(classifier_free_guidance(logits, -logits, 0.0), logits)
    assert torch.equal(guided(lambda x, t, u: x + 1, 0.0)(torch.zeros(2), None), torch.ones(2))

    def states(seed):  # the noise of every draw comes from the caller's generator
        seen = []

        def denoise(x_t, t):
            seen.append(x_t.clone())
            return torch.zeros(1, k, 4, 4)

        gens = generators([seed], "cpu")
        _run(denoise, tr, (1, 4, 4), 3, noise=lambda size: seeded_uniform(size, gens, "cpu"))
        return torch.stack(seen[1:])  # the re-noised states

    assert torch.equal(states(1), states(1)) and not torch.equal(states(1), states(2))


def test_add_noise_draws_from_q_xt_given_x0():
    tr = DiscreteTransition(5, 10, "hybrid")
    x0 = torch.randint(0, 5, (2, 6, 6), generator=torch.Generator().manual_seed(3))
    u = torch.rand(2, tr.num_states, 6, 6, generator=torch.Generator().manual_seed(4))
    assert torch.equal(tr.add_noise(x0, 4, u), sample_categorical(tr.q_probs(x0, 4), u))
    assert tr.add_noise(x0, 0).equal(x0)  # t = 0: no noise


def test_diffusion_does_not_import_the_models():
    import subprocess
    import sys

    code = ("import sys, densediff.diffusion.codecs, densediff.diffusion.samplers; "
            "print(any(m.startswith('densediff.models') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
