"""The DDPS model: frozen base, condition features, training targets and losses (Alg. 1),
sampling (Alg. 2: stride, free / posterior re-noising, guidance), codecs, batch independence."""

from __future__ import annotations

import pytest
import torch

from densediff.diffusion.samplers import classifier_free_guidance
from densediff.errors import ConfigError
from densediff.models import DDP, DDPS, build_base
from densediff.tasks import build_model, load_config
from densediff.utils.batching import batch_invariant

K = 5
BASE = ["model.encoder.variant=tiny", "model.neck.channels=16", "model.neck.num_groups=4",
        "model.head.channels=16", "model.aux_head.channels=16"]
UNET = ["model.ddps.unet.dim=16", "model.ddps.unet.heads=2", "model.ddps.unet.dim_head=8",
        "model.ddps.unet.out_channels=16", "model.ddps.unet.groups=4", "model.ddps.timesteps=10",
        "model.ddps.steps=3"]


def make(*overrides: str, base_overrides: tuple[str, ...] = ()) -> DDPS:
    torch.manual_seed(0)
    base = build_model(load_config(None, [*BASE, *base_overrides]), K)
    cfg = load_config(None, [*BASE, "model.type=ddps", "model.ddps.base=unused", *UNET,
                             *overrides])
    return DDPS(cfg.model, K, base, ignore_index=cfg.data.ignore_index)


def batch(b: int = 2, size: int = 32):
    g = torch.Generator().manual_seed(1)
    img = torch.randn(b, 3, size, size, generator=g)
    label = torch.randint(0, K, (b, size, size), generator=g)
    label[:, :4] = 255
    return img, label


def test_condition_is_the_input_of_the_base_classifier():
    model = make()
    img, _ = batch()
    cond = model.extract(img)
    base = model.base
    with torch.no_grad():
        f = base.head.convs(base.extract(img))
        assert torch.allclose(cond.features, f, atol=1e-6)
        assert torch.allclose(cond.logits, base.head.conv_seg(f), atol=1e-6)
    assert cond.features.shape == (2, 16, 8, 8)


def test_base_stays_frozen_and_in_eval_mode():
    model = make()
    model.train()
    assert not model.base.training and model.unet.training
    assert not any(p.requires_grad for p in model.base.parameters())
    img, label = batch()
    before = {k: v.clone() for k, v in model.base.state_dict().items()}
    losses = model.forward_train(img, label)
    losses["loss"].backward()
    assert all(p.grad is None for p in model.base.parameters())
    assert all(p.grad is not None for p in model.unet.parameters())
    # BatchNorm running statistics of the base do not move
    assert all(torch.equal(before[k], v) for k, v in model.base.state_dict().items())
    # the state embedding is a frozen buffer of the codec, not a parameter; checkpoints keep
    # the key they had before the codec was its own module
    assert "codec.state_embed" in dict(model.named_buffers())
    assert "state_embed" in model.state_dict() and "codec.state_embed" not in model.state_dict()


def test_checkpoint_keys_round_trip():
    from densediff.utils.checkpoint import load_into

    model, other = make(), make()
    torch.nn.init.normal_(other.codec.state_embed)
    load_into(other, model.state_dict())  # the flat "state_embed" key loads into the codec
    assert torch.equal(other.codec.state_embed, model.codec.state_embed)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("codec,target,loss", [
    ("resize", "first_prediction", "ce"), ("resize", "ground_truth", "ce"),
    ("resize", "initial_prediction", "ce"), ("resize", "first_prediction", "vlb"),
    ("bits", "first_prediction", "ce"), ("bits", "ground_truth", "ce"),
    ("bits", "initial_prediction", "ce")])
def test_every_target_codec_and_loss_trains(codec, target, loss):
    model = make(f"model.ddps.codec={codec}", f"model.ddps.target={target}",
                 f"model.ddps.loss={loss}", "model.ddps.cond_drop=0.5")
    img, label = batch()
    losses = model.forward_train(img, label)
    expected = {"loss", "loss_ce"} | ({"loss_vlb"} if loss == "vlb" else set())
    assert set(losses) == expected
    assert torch.isfinite(losses["loss"]) and float(losses["loss"].detach()) > 0
    assert torch.allclose(losses["loss"], sum(v for k, v in losses.items() if k != "loss"))
    losses["loss"].backward()
    assert model.conv_seg.weight.grad is not None
    assert float(model.unet.init_conv.weight.grad.abs().sum()) > 0


def test_noise_targets(monkeypatch):
    """Table 3b: ground truth, the base's prediction, or the model's own first prediction."""
    img, label = batch()
    for target in ("ground_truth", "initial_prediction", "first_prediction"):
        model = make(f"model.ddps.target={target}")
        cond = model.extract(img)
        small = torch.nn.functional.interpolate(label[:, None].float(), size=(8, 8))[:, 0].long()
        torch.manual_seed(3)
        x0 = model._noise_target(cond, cond.features, small)
        if target == "ground_truth":
            ok = small != 255
            assert torch.equal(x0[ok], small[ok]) and int(x0.max()) < K
        elif target == "initial_prediction":
            assert torch.equal(x0, cond.logits.argmax(1))
        else:  # one denoiser call at t = T on x_T from the stationary distribution
            calls = []
            denoise = model.denoise

            def spy(f, x, t, calls=calls, denoise=denoise):
                out = denoise(f, x, t)
                calls.append((x.clone(), t.clone(), out.clone()))
                return out

            monkeypatch.setattr(model, "denoise", spy)
            torch.manual_seed(3)
            x0b = model._noise_target(cond, cond.features, small)
            assert torch.equal(x0, x0b)  # seeded: the same x_T, the same target
            assert len(calls) == 1
            x_in, t, logits = calls[0]
            assert torch.all(t == 1000.0)
            # the target is the argmax of that call's x0 logits, on x_T drawn as pure noise
            assert torch.equal(x0b, logits.argmax(1))
            torch.manual_seed(3)
            assert torch.equal(x_in, model.codec.pure_noise(2, 8, 8, img.device).x_in)
            # and it is neither the GT nor the base's prediction
            assert not torch.equal(x0b, cond.logits.argmax(1)) and not torch.equal(x0b, small)


def test_two_stage_training_uses_only_the_first_step_first(monkeypatch):
    model = make("model.ddps.single_step_iters=5", "model.ddps.target=ground_truth")
    model.train()
    seen = []
    denoise = model.denoise
    monkeypatch.setattr(model, "denoise", lambda f, x, t: seen.append(t.clone()) or denoise(f, x, t))
    img, label = batch(4)
    model.set_iteration(0)
    model.forward_train(img, label)
    assert torch.all(seen[-1] == 1000.0)  # t = T for every image
    model.set_iteration(5)
    for _ in range(3):
        model.forward_train(img, label)
    assert any(bool(torch.any(t < 1000.0)) for t in seen[1:])


def test_vlb_terms():
    model = make("model.ddps.loss=vlb")
    x0 = torch.randint(0, K, (2, 6, 6))
    x_t = torch.randint(0, K, (2, 6, 6))
    perfect = torch.nn.functional.one_hot(x0, K).permute(0, 3, 1, 2).float() * 50
    rand = torch.randn(2, K, 6, 6)
    for t in (torch.tensor([4, 7]), torch.tensor([2, 10])):  # KL terms
        assert float(model.vlb(perfect, x_t, x0, t)) == pytest.approx(0.0, abs=1e-4)
        assert float(model.vlb(rand, x_t, x0, t)) > 1e-3
    t1 = torch.tensor([1, 1])  # -log p(x0 | x_1)
    nll = torch.nn.functional.cross_entropy(rand, x0)
    assert float(model.vlb(rand, x_t, x0, t1)) == pytest.approx(float(nll), rel=1e-4)
    x0[0] = 255  # ignore pixels are left out
    assert float(model.vlb(rand, x_t, x0, t1)) == pytest.approx(
        float(torch.nn.functional.cross_entropy(rand[1:], x0[1:])), rel=1e-4)


def test_guidance_algebra():
    c, u = torch.randn(2, K, 4, 4), torch.randn(2, K, 4, 4)
    assert torch.equal(classifier_free_guidance(c, u, 0.0), c)
    assert torch.allclose(classifier_free_guidance(c, u, 0.4), 1.4 * c - 0.4 * u)
    model = make().eval()
    cond = model.extract(batch()[0])
    x = model.codec.embed(torch.randint(0, K, (2, 8, 8)))
    t = torch.full((2,), 500.0)
    with torch.no_grad():
        lc = model.denoise(cond.features, x, t)
        lu = model.denoise(torch.zeros_like(cond.features), x, t)
        assert torch.allclose(model.guided(cond.features, x, t, 0.7), 1.7 * lc - 0.7 * lu,
                              atol=1e-5)
        assert torch.allclose(model.guided(cond.features, x, t, 0.0), lc)


def test_sampling_visits_the_stride_times_and_renoises(monkeypatch):
    model = make("model.ddps.timesteps=20").eval()
    cond = model.extract(batch()[0])
    times = []
    denoise = model.denoise
    monkeypatch.setattr(model, "denoise", lambda f, x, t: times.append(float(t[0])) or
                        denoise(f, x, t))
    traj = model.sample_steps(cond, 3, seeds=[0, 1])
    assert times == [1000.0, 500.0, 50.0]  # t = 20, 10, 1 of T = 20
    assert len(traj.steps) == 3 and traj.steps[0].shape == (2, 1, K, 8, 8)
    base = model.sample_steps(cond, 0)  # steps = 0: the base segmentor
    assert torch.equal(base.steps[0][:, 0], cond.logits)
    post = model.sample_steps(cond, 3, seeds=[0, 1], renoise="posterior")
    assert torch.equal(post.steps[0], traj.steps[0])  # same start, same first step
    assert not torch.equal(post.steps[2], traj.steps[2])


@pytest.mark.parametrize("extra", [
    [], ["model.ddps.renoise=posterior"], ["model.ddps.guidance=0.5"],
    ["model.ddps.transition=hybrid"], ["model.ddps.codec=bits"]])
def test_batch_of_three_is_bit_identical_to_three_single_runs(extra):
    """With ``batch_invariant`` (what ``predict`` runs a batch with) bit for bit; the seeded
    noise alone gives float-rounding agreement."""
    model = make(*extra).eval()
    img, _ = batch(3)
    with batch_invariant(model, 3):
        together = model.sample_steps(model.extract(img), 3, seeds=[4, 5, 6]).step_outputs()
    loose = model.sample_steps(model.extract(img), 3, seeds=[4, 5, 6]).step_outputs()
    for i in range(3):
        one = model.extract(img[i:i + 1])
        alone = model.sample_steps(one, 3, seeds=[4 + i]).step_outputs()
        assert torch.equal(together[:, i], alone[:, 0]), i
        assert torch.allclose(loose[:, i], alone[:, 0], atol=1e-4), i


def test_same_seed_same_result_other_seed_other_noise():
    model = make().eval()
    cond = model.extract(batch(1)[0])
    a = model.sample_steps(cond, 2, seeds=[7]).step_outputs()
    b = model.sample_steps(cond, 2, seeds=[7]).step_outputs()
    c = model.sample_steps(cond, 2, seeds=[8]).step_outputs()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_predict_map_at_input_size():
    model = make().eval()
    img, _ = batch(2, 36)  # 9 x 9 grid: the UNet pads to 12 x 12 and crops back
    with torch.no_grad():
        out = model.predict_map(img, steps=2, seeds=[0, 1])
    assert out.shape == (2, K, 36, 36) and torch.isfinite(out).all()


def test_a_ddp_model_can_be_the_base():
    ddp_base = ("model.type=ddp", "model.head.type=deformable", "model.head.num_layers=1",
                "model.head.num_heads=4", "model.head.ffn_channels=32",
                "model.diffusion.embed_channels=16", "model.diffusion.steps=2")
    model = make(base_overrides=ddp_base).eval()
    assert isinstance(model.base, DDP)
    img, label = batch()
    cond = model.extract(img)
    assert cond.features.shape == (2, 16, 8, 8)
    again = model.extract(img)  # fixed base noise: deterministic
    assert torch.equal(cond.logits, again.logits)
    model.train()
    assert torch.isfinite(model.forward_train(img, label)["loss"])


def test_base_with_other_classes_is_refused():
    base_cfg = load_config(None, BASE)
    base_cfg.data.class_names = ["a", "b", "c"]
    cfg = load_config(None, ["model.type=ddps", "model.ddps.base=unused", *UNET])
    cfg.model.ddps.base_config = base_cfg.to_dict()
    with pytest.raises(ConfigError, match="base segmentor has 3 classes but the data has 5"):
        build_base(cfg, K)
    base_cfg.data.class_names = None
    base_cfg.model.ddps.base = "x"
    base_cfg.model.type = "ddps"
    cfg.model.ddps.base_config = base_cfg.to_dict()
    with pytest.raises(ConfigError, match="not ddps"):
        build_base(cfg, K)


@pytest.mark.parametrize("size,paper", [("t", 3.38), ("s", 11.34), ("m", 41.34), ("l", 158.53)])
def test_unet_size_configs_match_the_paper(size, paper):
    """App. D Table 5: UNet-T/S/M/L parameter counts (the paper's include the classifier and
    embedding; ours are within 3 %)."""
    from densediff.config import PACKAGED_CONFIGS
    from densediff.decoders.unet import UNet

    u = load_config(PACKAGED_CONFIGS / f"_base_/unet_{size}.yaml").model.ddps.unet
    with torch.device("meta"):
        net = UNet(256 + 16, u.out_channels, u.dim, u.dim_mults, u.groups, u.heads, u.dim_head)
    n = sum(p.numel() for p in net.parameters()) / 1e6
    assert n == pytest.approx(paper, rel=0.03)


@pytest.mark.parametrize("codec", ["resize", "bits"])
def test_no_diffusion_control_is_one_call_on_a_zero_mask(codec, monkeypatch):
    """Table 7's control: same parameters as DDPS, trained with CE on the GT from an all-zero
    mask input at a fixed time, sampled in one call; never draws noise."""
    model = make(f"model.ddps.codec={codec}", "model.ddps.diffusion=false", "model.ddps.steps=1")
    twin = make(f"model.ddps.codec={codec}")
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in twin.parameters())
    seen = []
    real = model.denoise
    monkeypatch.setattr(model, "denoise", lambda f, x, t: seen.append((x, t)) or real(f, x, t))
    img, label = batch()
    losses = model.forward_train(img, label)
    assert set(losses) == {"loss", "loss_ce"} and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert float(model.unet.init_conv.weight.grad.abs().sum()) > 0
    assert len(seen) == 1 and not seen[0][0].any() and not seen[0][1].any()
    model.eval()
    seen.clear()
    cond = model.extract(img)
    a = model.sample_steps(cond, 1, seeds=[1, 2]).output(False)
    b = model.sample_steps(cond, 1, seeds=[3, 4]).output(False)
    assert torch.equal(a, b) and len(seen) == 2  # deterministic: no noise anywhere
    assert torch.equal(model.sample_steps(cond, 0).output(False), cond.logits)
    with pytest.raises(ValueError, match="one call"):
        model.sample_steps(cond, 2)
    assert model.max_steps == 1


def test_no_diffusion_control_config_is_checked():
    with pytest.raises(ConfigError, match="model.ddps.steps must be 1"):
        make("model.ddps.diffusion=false", "model.ddps.steps=3")
    with pytest.raises(ConfigError, match="loss must be ce"):
        make("model.ddps.diffusion=false", "model.ddps.steps=1", "model.ddps.loss=vlb")


def test_no_diffusion_control_step_check_says_why():
    from densediff.api import check_steps
    from densediff.errors import UserError

    model = make("model.ddps.diffusion=false", "model.ddps.steps=1")
    check_steps(model, [0, 1])
    with pytest.raises(UserError, match=r"0\.\.1 \(the no-diffusion control makes one call\)"):
        check_steps(model, [1, 2])
