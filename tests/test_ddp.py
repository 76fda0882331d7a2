"""The DDP model: training objective (Alg. 1 and 4), sampling (Alg. 2), dynamic inference,
uncertainty on a trained toy model, and the non-diffusion twin."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from densediff.diffusion import alpha_sigma
from densediff.engine.evaluate import evaluate_steps
from densediff.models import DDP, Segmentor
from densediff.tasks import build_model, load_config
from densediff.testing.models import small_model
from densediff.testing.spies import assert_self_aligned, record_denoise
from densediff.testing.tiny import SMALL_DDP as SMALL
from densediff.utils.batching import batch_invariant


def test_training_step_noises_the_encoded_gt_per_alg1():
    model = small_model()
    img, label = torch.randn(2, 3, 64, 64), torch.randint(0, 6, (2, 64, 64))
    label[0, :8] = 255
    calls = record_denoise(model)
    losses = model.forward_train(img, label)
    seen = {"x_t": calls[-1].x_t, "log_snr": calls[-1].log_snr}
    assert set(losses) == {"loss_ce", "loss_aux", "loss"}
    assert torch.allclose(losses["loss"], losses["loss_ce"] + losses["loss_aux"])
    losses["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
    # y_t = alpha y0 + sigma eps with y0 the encoding of the GT at 1/4 size: eps is standard normal
    small = torch.nn.functional.interpolate(label[:, None].float(), size=(16, 16), mode="nearest")
    y0 = model.encode_labels(small[:, 0].long()).detach()
    a, s = (v.view(2, 1, 1, 1) for v in alpha_sigma(seen["log_snr"]))
    eps = (seen["x_t"] - a * y0) / s
    assert seen["x_t"].shape == y0.shape == (2, 32, 16, 16)
    assert abs(float(eps.mean())) < 0.1 and abs(float(eps.std()) - 1) < 0.1
    # t ~ U(0, 0.999): log-SNR within the schedule's range over that interval
    assert torch.all(seen["log_snr"] > model.schedule(torch.tensor(0.999)) - 1e-4)


def test_self_aligned_training_noises_the_models_own_prediction():
    model = small_model("model.diffusion.self_aligned=true")
    calls = record_denoise(model)
    label = torch.randint(0, 6, (2, 64, 64))
    model.forward_train(torch.randn(2, 3, 64, 64), label)
    assert len(calls) == 2
    assert not calls[0].grad and calls[1].grad  # the t = 1 prediction carries no gradient
    # Alg. 4: the second input is alpha * enc(argmax of the first call's logits) + sigma * eps,
    # eps the first call's input (the same noise), not the GT's encoding
    with torch.no_grad():
        gt = model.encode_target(label, (16, 16))
    assert_self_aligned(model, calls, lambda logits: model.map_encoding(logits.argmax(1)), gt,
                        atol=1e-6, gt_atol=1e-3)


def test_self_aligned_training_still_trains_the_map_embedding():
    """Alg. 4 as the official code: the prediction is detached, but its re-encoding is made
    outside no_grad, so the class embedding receives gradients through y_0 (only through
    y_0: the loss sees no GT encoding in Alg. 4)."""
    model = small_model("model.diffusion.self_aligned=true")
    losses = model.forward_train(torch.randn(2, 3, 64, 64), torch.randint(0, 6, (2, 64, 64)))
    losses["loss_ce"].backward()
    grad = model.map_encoding.embedding.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0


def test_batch_of_four_equals_four_single_runs_with_the_same_seeds():
    model = small_model("model.diffusion.randsteps=2").eval()
    img = torch.randn(4, 3, 64, 64)
    seeds = [11, 12, 13, 14]
    with torch.no_grad():
        feat = model.extract(img)
        batch = model.sample_steps(feat, 3, seeds=seeds)
        with batch_invariant(model, 4):  # what predict runs a batch with: bit for bit
            exact = model.sample_steps(feat, 3, seeds=seeds)
        for i in range(4):
            single = model.sample_steps(feat[i:i + 1], 3, seeds=seeds[i:i + 1])
            for lb, le, ls in zip(batch.steps, exact.steps, single.steps):
                assert torch.allclose(lb[i:i + 1], ls, atol=1e-4)
                assert torch.equal(le[i:i + 1], ls)
        again = model.sample_steps(feat, 3, seeds=seeds)
        other = model.sample_steps(feat, 3, seeds=[1, 2, 3, 4])
    assert torch.equal(batch.steps[-1], again.steps[-1])  # seeded: reproducible
    assert not torch.allclose(batch.steps[0], other.steps[0])  # different noise, different map
    assert batch.steps[0].shape == (4, 2, 6, 16, 16)  # B x randsteps x K x h x w


def test_trajectory_outputs_accumulation_and_randsteps():
    model = small_model().eval()
    with torch.no_grad():
        traj = model.sample_steps(model.extract(torch.randn(2, 3, 32, 32)), 4, randsteps=3,
                                  seeds=[0, 1])
    assert len(traj.steps) == 4 and traj.steps[0].shape == (2, 3, 6, 8, 8)
    assert traj.output(False).shape == traj.output(True).shape == (2, 6, 8, 8)
    assert torch.allclose(traj.output(True).sum(1), torch.ones(2, 8, 8), atol=1e-5)
    assert torch.equal(traj.output(False), traj.steps[-1].mean(1))  # logits
    assert traj.step_outputs().shape == (4, 2, 6, 8, 8)


def test_trajectory_probabilities_by_hand():
    """Two steps x two starts, K = 2, one cell, logits chosen so every softmax is known:
    (0, 0) -> 0.5, (ln 3, 0) -> 0.75, (0, ln 3) -> 0.25, (ln 9, 0) -> 0.9 for class 0.
    Accumulation: the mean of the four, 2.4 / 4 = 0.6. The official output: the softmax of
    the last step's logits averaged over starts, (ln 3, ln 3 / 2) -> 3 / (3 + sqrt 3)."""
    from densediff.models.interface import Trajectory

    ln3, ln9 = math.log(3), math.log(9)
    step0 = torch.tensor([[0.0, 0.0], [ln3, 0.0]]).view(1, 2, 2, 1, 1)  # B x R x K x h x w
    step1 = torch.tensor([[0.0, ln3], [ln9, 0.0]]).view(1, 2, 2, 1, 1)
    traj = Trajectory([step0, step1], "classes")
    assert traj.output(True).flatten().tolist() == pytest.approx([0.6, 0.4])
    official = 3 / (3 + math.sqrt(3))
    assert traj.output(False).softmax(1).flatten().tolist() == pytest.approx(
        [official, 1 - official])
    assert traj.output(False).flatten().tolist() == pytest.approx([ln3, ln3 / 2])
    assert traj.step_outputs().flatten().tolist() == pytest.approx([ln3 / 2, 0, ln9 / 2, ln3 / 2])
    with pytest.raises(ValueError, match="kind"):
        Trajectory([step0], "labels")


def test_predict_map_respects_steps_and_ddpm():
    model = small_model().eval()
    img = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a = model.predict_map(img, steps=1, seeds=[0])
        b = model.predict_map(img, steps=5, seeds=[0])
        c = model.predict_map(img, steps=5, sampler="ddpm", seeds=[0])
    assert a.shape == (1, 6, 32, 32)
    assert not torch.allclose(a, b) and not torch.allclose(b, c)


@pytest.mark.parametrize("encoding, channels", [("onehot", 6), ("analog_bits", 3)])
def test_other_encodings_train_and_sample(encoding, channels):
    model = small_model(f"model.diffusion.encoding={encoding}", "model.diffusion.scale=0.1")
    assert model.map_encoding.channels == channels
    model.forward_train(torch.randn(2, 3, 32, 32), torch.randint(0, 6, (2, 32, 32)))["loss"].backward()
    with torch.no_grad():
        assert model.eval().predict_map(torch.randn(1, 3, 32, 32), steps=2).shape == (1, 6, 32, 32)


def test_twin_is_the_same_decoder_without_time_and_noisy_map():
    cfg = load_config(None, [*SMALL, "model.type=segmentor"])
    twin = build_model(cfg, 6)
    ddp = small_model()
    assert isinstance(twin, Segmentor)
    twin_keys = {k for k in twin.state_dict() if k.startswith("head.")}
    ddp_keys = {k.replace("decoder.", "head.", 1) for k in ddp.state_dict()
                if k.startswith("decoder.") and ".time_mlp." not in k}
    assert twin_keys == ddp_keys


def test_ddp_config_needs_the_deformable_head():
    from densediff.errors import ConfigError

    with pytest.raises(ConfigError, match="head.type: deformable"):
        load_config(None, ["model.type=ddp"])


# ------------------------------------------------------------------------ trained toy model

@pytest.fixture
def toy(toy_ddp):
    """The session's trained toy DDP (conftest ``toy_ddp``, trained with
    :data:`densediff.testing.tiny.TOY_DDP`)."""
    return toy_ddp


def test_ddp_training_loss_falls(toy):
    cfg, metrics = toy
    rows = list(csv.DictReader(open(Path(cfg.work_dir) / "metrics.csv")))
    losses = [float(r["loss"]) for r in rows if r["loss"]]
    assert len(losses) == 150
    assert sum(losses[-15:]) < 0.8 * sum(losses[:15])
    assert metrics["iter"] == 150 and metrics["mIoU"] > 0


def test_uncertainty_is_higher_on_wrong_pixels_of_a_trained_model(toy):
    from densediff.api import load_model
    from densediff.tasks import build_dataset

    cfg, _ = toy
    model, cfg, _, _ = load_model(Path(cfg.work_dir) / "checkpoints" / "best.safetensors")
    model.eval()
    dataset = build_dataset(cfg, cfg.data.val_split, train=False)
    res = evaluate_steps(model, dataset, cfg, steps=[1, 3, 5], progress=False)
    assert list(res) == [1, 3, 5]
    for n in (3, 5):
        unc = res[n]["uncertainty"]
        assert unc["entropy"]["AUROC"] > 60
        assert unc["steps"]["AUROC"] > 50
        assert unc["entropy"]["err_top10"] > unc["entropy"]["err_all"]
    assert res[1]["uncertainty"]["steps"]["AUROC"] == pytest.approx(50)  # one step: no changes
    # the maps themselves: in [0, 1], and larger on wrong pixels
    from densediff.pipelines.segmentation import uncertainty_maps

    wrong_u, right_u = [], []
    with torch.no_grad():
        for i in range(len(dataset)):
            item = dataset[i]
            img, label = item["image"][None], item["label"][None]
            probs, steps_lab, maps = uncertainty_maps(model, model.extract(img), 5,
                                                      tuple(label.shape[-2:]), False, [i])
            assert steps_lab.shape == (5, 1, *label.shape[-2:])
            for m in maps.values():
                assert float(m.min()) >= 0 and float(m.max()) <= 1
            wrong = probs.argmax(1) != label
            wrong_u.append(maps["entropy"][wrong])
            right_u.append(maps["entropy"][~wrong])
    assert float(torch.cat(wrong_u).mean()) > float(torch.cat(right_u).mean())


def test_models_are_built_from_their_config_sections():
    """A model needs its config section (and a few data facts by keyword), not a run config;
    ``build_model`` hands the run config's sections down."""
    from densediff.config import ModelConfig

    cfg = load_config(None, [*SMALL, "data.ignore_index=7"])
    built = small_model("data.ignore_index=7")
    torch.manual_seed(0)
    direct = DDP(cfg.model, 6, ignore_index=7)
    assert direct.ignore_index == built.ignore_index == 7
    assert all(torch.equal(v, direct.state_dict()[k]) for k, v in built.state_dict().items())
    seg = Segmentor(ModelConfig.model_validate({"encoder": {"variant": "tiny"},
                                                "neck": {"channels": 16, "num_groups": 4},
                                                "head": {"channels": 16}}), 3)
    assert seg.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3, 32, 32)
