"""The DDP levers beyond the official recipe (issue #13): input preconditioning, the training
time distribution, the sampling start time, self-conditioning and the map-path learning rate.
Each is checked against its formula; the defaults must leave the official model unchanged."""

from __future__ import annotations

import pytest
import torch

from densediff.diffusion import alpha_sigma
from densediff.diffusion.samplers import sampling_times
from densediff.diffusion.schedules import schedule_time
from densediff.engine.optim import param_groups
from densediff.tasks import load_config
from densediff.testing.models import small_model


def _fuse_inputs(model):
    seen = []
    model.fuse.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    return seen


def test_defaults_are_the_official_model():
    d = load_config(None, ["model.type=ddp", "model.head.type=deformable"]).model.diffusion
    assert (d.precondition, d.train_time_power, d.sample_start, d.self_condition) == (
        False, 1.0, 1.0, False)
    model = small_model()
    assert model.fuse.in_channels == model.feat_channels + model.map_encoding.channels


def test_preconditioning_brings_y_t_to_unit_size_per_the_formula():
    model = small_model("model.diffusion.precondition=true").eval()
    seen = _fuse_inputs(model)
    feat = torch.randn(2, model.feat_channels, 8, 8)
    y0 = model.encode_labels(torch.randint(0, 6, (2, 8, 8)))
    for t in (0.0, 0.5, 0.99):
        ls = model.schedule(torch.full((2,), t))
        a, s = (v.view(2, 1, 1, 1) for v in alpha_sigma(ls))
        x_t = a * y0 + s * torch.randn_like(y0)
        with torch.no_grad():
            model.denoise(feat, x_t, ls)
        scale = model.diffusion_cfg.scale
        expected = x_t / (a**2 * scale**2 + s**2).sqrt()
        got = seen[-1][:, model.feat_channels:]
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
        assert 0.3 < float(got.pow(2).mean().sqrt()) < 1.5  # about unit size at every t


def test_training_time_power_moves_t_towards_zero():
    def mean_t(power):
        model = small_model(f"model.diffusion.train_time_power={power}")
        seen = []
        denoise = model.denoise
        model.denoise = lambda f, x, ls: seen.append(ls.detach()) or denoise(f, x, ls)
        torch.manual_seed(1)
        model.forward_train(torch.randn(64, 3, 32, 32), torch.randint(0, 6, (64, 32, 32)))
        t = schedule_time("cosine", seen[0])
        assert float(t.min()) >= 0 and float(t.max()) <= 0.999 + 1e-4
        return float(t.mean())

    # E[u^p] = 1 / (p + 1): 0.5 (official, uniform) and 0.25 for p = 3, times 0.999
    assert abs(mean_t(1.0) - 0.5) < 0.1
    assert abs(mean_t(3.0) - 0.25) < 0.08


def test_sampling_start_time():
    flat = [t for pair in sampling_times(3, 1.0, 0.999) for t in pair]
    assert flat == pytest.approx([0.999, 0.333, 0.666, 0.0, 0.333, 0.0])
    assert sampling_times(3, 1.0) == sampling_times(3, 1.0, 1.0)
    model = small_model("model.diffusion.sample_start=0.999").eval()
    seen = []
    denoise = model.denoise
    model.denoise = lambda f, x, ls: seen.append(ls.clone()) or denoise(f, x, ls)
    model.sample_steps(torch.randn(1, model.feat_channels, 8, 8), 2)
    assert torch.allclose(seen[0], model.schedule(torch.tensor([0.999])))
    assert torch.allclose(seen[1], model.schedule(torch.tensor([0.4995])))


def test_self_conditioning_feeds_the_previous_estimate():
    model = small_model("model.diffusion.self_condition=true").eval()
    c_map = model.map_encoding.channels
    assert model.fuse.in_channels == model.feat_channels + 2 * c_map
    seen = _fuse_inputs(model)
    feat = torch.randn(1, model.feat_channels, 8, 8)
    traj = model.sample_steps(feat, 3, seeds=[5])
    assert len(seen) == 3
    assert float(seen[0][:, -c_map:].abs().max()) == 0  # no estimate before the first step
    for s in (1, 2):  # step s reads the encoding of step s - 1's prediction
        prev = model.encode_prediction(traj.steps[s - 1][:, 0])
        assert torch.allclose(seen[s][:, -c_map:], prev)


def test_self_conditioning_in_training_is_a_no_grad_first_pass_half_the_time():
    """Chen et al. 2022, Alg. 1: with probability 1/2 a first, gradient-free pass whose
    encoded prediction is the second pass's ``x0_prev``. 40 seeded draws: Binomial(40, 1/2)
    lies in 12..28 with probability 0.998 (fixed seeds: the test is deterministic)."""
    model = small_model("model.diffusion.self_condition=true")
    counts = []
    for seed in range(40):
        calls = []
        denoise = model.denoise

        def spy(f, x, ls, prev=None, denoise=denoise, calls=calls):
            out = denoise(f, x, ls, prev)
            calls.append((torch.is_grad_enabled(), prev, out.detach()))
            return out

        model.denoise = spy
        torch.manual_seed(seed)
        model.forward_train(torch.randn(2, 3, 32, 32), torch.randint(0, 6, (2, 32, 32)))
        model.denoise = denoise
        if len(calls) == 2:
            (grad1, prev1, out1), (grad2, prev2, _) = calls
            assert (grad1, prev1, grad2) == (False, None, True)
            with torch.no_grad():
                assert torch.allclose(prev2, model.encode_prediction(out1))
        else:
            assert len(calls) == 1 and calls[0][0] and calls[0][1] is None
        counts.append(len(calls))
    assert 12 <= counts.count(2) <= 28


def test_map_path_learning_rate_multiplier():
    cfg = load_config(None, ["model.type=ddp", "model.head.type=deformable",
                             "train.head_lr_mult=2", "train.map_lr_mult=5"])
    model = small_model()
    groups = {g["name"]: g for g in param_groups(model, cfg.train)}
    assert groups["map_decay"]["lr_mult"] == 10.0 and groups["head_decay"]["lr_mult"] == 2.0
    names = {id(p): n for n, p in model.named_parameters()}
    in_map = {names[id(p)] for g in groups.values() if g["name"].startswith("map")
              for p in g["params"]}
    assert in_map == {n for n, _ in model.named_parameters()
                      if n.startswith(("map_encoding.", "fuse."))}
    plain = {g["name"] for g in param_groups(model, load_config(None, []).train)}
    assert not any(n.startswith("map") for n in plain)  # default: the groups as before
