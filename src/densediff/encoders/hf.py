"""Hugging Face ``transformers`` backbones behind the :class:`Encoder` contract.

Families and variants (published architectures; random init unless ``pretrained`` is set):

- ``swin`` tiny / small / base / large (patch 4, window 7): ``SwinBackbone``.
- ``convnext`` tiny / small / base / large: ``ConvNextBackbone``.
- ``segformer`` b0 ... b5 (the Mix Transformer encoder of SegFormer): ``SegformerModel``.
- ``resnet`` 18 / 34 / 50 / 101 (v1.5, as ``microsoft/resnet-*``): ``ResNetBackbone``.
- ``mobilenetv2`` 1.0 (as ``google/mobilenet_v2_1.0_224``): ``MobileNetV2Model``; levels are
  the outputs of inverted-residual layers 1, 4, 11, 15 (24, 32, 96, 320 channels).

Weights are read offline only (never from the Hub): ``pretrained`` is a local
``save_pretrained`` folder (e.g. a downloaded Hub snapshot; classification checkpoints such as
``SwinForImageClassification`` work, their head is dropped) or a single ``.safetensors`` file
with the same tensor names. Swin and ConvNeXt add a fresh LayerNorm per output level
(``hidden_states_norms``, as mmseg does); those are the only weights allowed to be missing.

Input normalisation: Swin, ConvNeXt, MiT and ResNet weights expect ImageNet mean/std (the
pipeline default); the MobileNetV2 weights (converted from TensorFlow) expect
``(x - 127.5) / 127.5``, which the encoder applies itself (see :class:`Encoder`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from densediff.config import EncoderConfig
from densediff.encoders.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    check_loading,
)
from densediff.errors import CheckpointError, ConfigError, one_line
from densediff.utils.checks import json_loads, read_text

SWIN_VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24]),
    "small": dict(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24]),
    "base": dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32]),
    "large": dict(embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48]),
}
CONVNEXT_VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3]),
    "small": dict(hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 27, 3]),
    "base": dict(hidden_sizes=[128, 256, 512, 1024], depths=[3, 3, 27, 3]),
    "large": dict(hidden_sizes=[192, 384, 768, 1536], depths=[3, 3, 27, 3]),
}
SEGFORMER_VARIANTS: dict[str, dict[str, Any]] = {
    "b0": dict(hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2]),
    "b1": dict(hidden_sizes=[64, 128, 320, 512], depths=[2, 2, 2, 2]),
    "b2": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 4, 6, 3]),
    "b3": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 4, 18, 3]),
    "b4": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 8, 27, 3]),
    "b5": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 6, 40, 3]),
}
RESNET_VARIANTS: dict[str, dict[str, Any]] = {
    "18": dict(layer_type="basic", hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2]),
    "34": dict(layer_type="basic", hidden_sizes=[64, 128, 256, 512], depths=[3, 4, 6, 3]),
    "50": dict(layer_type="bottleneck", hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3]),
    "101": dict(layer_type="bottleneck", hidden_sizes=[256, 512, 1024, 2048],
                depths=[3, 4, 23, 3]),
}
MOBILENETV2_VARIANTS: dict[str, dict[str, Any]] = {"1.0": dict(depth_multiplier=1.0)}
# Fields shared by all variants of a family (spelled out rather than left to transformers'
# defaults, which match today).
SWIN_COMMON = dict(patch_size=4, window_size=7, mlp_ratio=4.0)
SEGFORMER_COMMON = dict(num_attention_heads=[1, 2, 5, 8], sr_ratios=[8, 4, 2, 1],
                        patch_sizes=[7, 3, 3, 3], strides=[4, 2, 2, 2], mlp_ratios=[4, 4, 4, 4])
RESNET_COMMON = dict(embedding_size=64)

MOBILENETV2_OUT_LAYERS = (1, 4, 11, 15)
"""Indices into ``MobileNetV2Model.layer`` whose outputs are the stride 4/8/16/32 levels (the
last layer before each downsampling, and the final 320-channel layer)."""

TF_INCEPTION_MEAN = (127.5, 127.5, 127.5)
TF_INCEPTION_STD = (127.5, 127.5, 127.5)
"""``(x - 127.5) / 127.5``: the input scaling of the TF-converted MobileNetV2 weights."""

_STAGES = ["stage1", "stage2", "stage3", "stage4"]
_NEW_OUTPUT_NORMS = ("hidden_states_norms.",)
"""Output norms that Swin/ConvNeXt backbones add; classification checkpoints lack them."""

log = logging.getLogger(__name__)


class HFSpec(NamedTuple):
    """Everything needed to build one family/variant."""

    config: Any  # a transformers PretrainedConfig
    model_class: type  # the transformers model class
    encoder_class: type  # the adapter below
    arch: dict[str, Any]  # architecture fields that a pretrained folder must match
    weights_norm: tuple[tuple[float, ...], tuple[float, ...]]  # (mean, std) on 0-255


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("model.encoder.name: this backbone needs the transformers package "
                          "(pip install 'densediff[hf]')") from None
    return transformers


def _variant(table: dict[str, dict], name: str, variant: str) -> dict[str, Any]:
    if variant not in table:
        raise ConfigError(f"model.encoder.variant: {name} has no variant {variant!r} "
                          f"(choose from {', '.join(table)})")
    return dict(table[variant])


def _no_drop_path(name: str, drop_path: float) -> None:
    if drop_path:
        raise ConfigError(f"model.encoder.drop_path: {name} has no stochastic depth; set it to 0")


def hf_spec(name: str, variant: str, drop_path: float = 0.0, window_size: int | None = None,
            **overrides: Any) -> HFSpec:
    """Config and classes for a transformers backbone.

    Args:
        name, variant, drop_path, window_size: as in :class:`~densediff.config.EncoderConfig`.
        **overrides: extra config fields (e.g. smaller sizes for tests); they win over the
            variant's published values.
    """
    tf = _transformers()
    imagenet = (IMAGENET_MEAN, IMAGENET_STD)
    if name == "swin":
        arch = _variant(SWIN_VARIANTS, name, variant)
        arch["window_size"] = window_size or SWIN_COMMON["window_size"]
        config = tf.SwinConfig(**{**SWIN_COMMON, **arch, "drop_path_rate": drop_path,
                                  "out_features": _STAGES, **overrides})
        return HFSpec(config, tf.SwinBackbone, BackboneEncoder, arch, imagenet)
    if name == "convnext":
        arch = _variant(CONVNEXT_VARIANTS, name, variant)
        config = tf.ConvNextConfig(**{**arch, "drop_path_rate": drop_path,
                                      "out_features": _STAGES, **overrides})
        return HFSpec(config, tf.ConvNextBackbone, BackboneEncoder, arch, imagenet)
    if name == "segformer":
        arch = _variant(SEGFORMER_VARIANTS, name, variant)
        config = tf.SegformerConfig(**{**SEGFORMER_COMMON, **arch, "drop_path_rate": drop_path,
                                       "reshape_last_stage": True, **overrides})
        return HFSpec(config, tf.SegformerModel, SegformerEncoder, arch, imagenet)
    if name == "resnet":
        _no_drop_path(name, drop_path)
        arch = _variant(RESNET_VARIANTS, name, variant)
        config = tf.ResNetConfig(**{**RESNET_COMMON, **arch, "out_features": _STAGES,
                                    **overrides})
        return HFSpec(config, tf.ResNetBackbone, BackboneEncoder, arch, imagenet)
    if name == "mobilenetv2":
        _no_drop_path(name, drop_path)
        arch = _variant(MOBILENETV2_VARIANTS, name, variant)
        config = tf.MobileNetV2Config(**{**arch, **overrides})
        return HFSpec(config, tf.MobileNetV2Model, MobileNetV2Encoder, arch,
                      (TF_INCEPTION_MEAN, TF_INCEPTION_STD))
    raise ConfigError(f"model.encoder.name: {name!r} is not a transformers backbone")


def build_hf_encoder(enc_cfg: EncoderConfig, data_mean=IMAGENET_MEAN, data_std=IMAGENET_STD,
                     **overrides: Any) -> Encoder:
    """Build (and optionally load) a transformers backbone as an :class:`Encoder`; ``frozen``
    is applied by :func:`densediff.encoders.build_encoder`.

    Args:
        enc_cfg: encoder config (name, variant, pretrained, drop_path).
        data_mean, data_std: the data pipeline's normalisation (0-255 scale).
        **overrides: config fields replacing the published variant's (tests use small sizes).
    """
    spec = hf_spec(enc_cfg.name, enc_cfg.variant, enc_cfg.drop_path, enc_cfg.window_size,
                   **overrides)
    if enc_cfg.pretrained:
        model = load_hf_model(spec, enc_cfg.pretrained, what=f"{enc_cfg.name} {enc_cfg.variant}")
    else:
        model = spec.model_class(spec.config)
    mean, std = spec.weights_norm
    return spec.encoder_class(model, weights_mean=mean, weights_std=std,
                              data_mean=data_mean, data_std=data_std)


# ------------------------------------------------------------------------------------------
# adapters


OWN_SIZE_HANDLING = ("swin", "convnext")
"""Backbones whose official DDP code (mmseg Swin, mmcls ConvNeXt) takes any input size itself:
Swin pads inside its ops (patch embedding to 4, windows to the window size, patch merging to
even sizes, all bottom/right), ConvNeXt's strided convs floor. These get no outer padding, so
features at sizes not divisible by 32 equal the official ones."""


MMCLS_DOWNSAMPLE_EPS = 1e-5
"""eps of ConvNeXt's downsampling LayerNorms in mmcls (its other norms use 1e-6)."""


def _keep_window(input_resolution) -> None:
    """Replaces transformers' ``SwinLayer.set_shift_and_window_size``, which shrinks the window
    (and drops the shift) for maps no larger than the window, and keeps the shrunk window for
    every later, larger input. mmseg's Swin (the official DDP backbone) keeps the configured
    window and shift at every size, padding the map to the window instead."""


class BackboneEncoder(Encoder):
    """Swin / ConvNeXt / ResNet through the transformers ``*Backbone`` API (4 out_features).

    Swin and ConvNeXt handle any input size as the official mmseg/mmcls backbones do (no outer
    padding, :data:`OWN_SIZE_HANDLING`); Swin keeps its window at every map size."""

    unused_weights = ("swin.layernorm.",)
    """Weights of the transformers model that this adapter drops (may be absent on load)."""

    def __init__(self, model: nn.Module, **encoder_kwargs):
        super().__init__(out_channels=model.channels, **encoder_kwargs)
        self.pads_input = model.config.model_type not in OWN_SIZE_HANDLING
        if model.config.model_type == "convnext":
            # mmcls' ConvNeXt (the official DDP backbone) builds its downsampling LayerNorms
            # with PyTorch's default eps 1e-5 (transformers: 1e-6, as the rest of the model)
            for stage in model.encoder.stages:
                norm = stage.downsampling_layer[0] if len(stage.downsampling_layer) else None
                if norm is not None:
                    norm.eps = MMCLS_DOWNSAMPLE_EPS
        if model.config.model_type == "swin":
            from transformers.models.swin.modeling_swin import SwinLayer

            swin = model.swin
            # SwinModel's final LayerNorm feeds no backbone output: drop it so every parameter
            # gets a gradient (DistributedDataParallel needs that).
            swin.layernorm = nn.Identity()
            for layer in swin.modules():
                if isinstance(layer, SwinLayer):
                    layer.set_shift_and_window_size = _keep_window
        self.model = model

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model(pixel_values=x).feature_maps)


class SegformerEncoder(Encoder):
    """The Mix Transformer (MiT) encoder: the four stage outputs of ``SegformerModel``."""

    unused_weights = ()

    def __init__(self, model: nn.Module, **encoder_kwargs):
        super().__init__(out_channels=model.config.hidden_sizes, **encoder_kwargs)
        self.model = model

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.model.stages:
            x = stage(x)  # B x C x h x w (reshape_last_stage=True)
            feats.append(x)
        return feats


class MobileNetV2Encoder(Encoder):
    """MobileNetV2 levels from inverted-residual layers 1, 4, 11, 15.

    The 1x1 conv to 1280 channels (classification only) is removed. transformers creates the
    BatchNorms with ``momentum=0.997`` (the TensorFlow *decay*, which in PyTorch means the
    running stats follow the last batch); they are reset to PyTorch's default 0.1.
    """

    unused_weights = ("conv_1x1.",)

    def __init__(self, model: nn.Module, **encoder_kwargs):
        out = [model.layer[i].reduce_1x1.convolution.out_channels for i in MOBILENETV2_OUT_LAYERS]
        super().__init__(out_channels=out, **encoder_kwargs)
        model.conv_1x1 = nn.Identity()
        model.pooler = None
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1
        self.model = model

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.model.conv_stem(x)
        feats = []
        for i, layer in enumerate(self.model.layer[: MOBILENETV2_OUT_LAYERS[-1] + 1]):
            x = layer(x)
            if i in MOBILENETV2_OUT_LAYERS:
                feats.append(x)
        return feats


# ------------------------------------------------------------------------------------------
# offline weight loading


def load_hf_model(spec: HFSpec, pretrained: str | os.PathLike, what: str) -> nn.Module:
    """Load ``spec.model_class`` weights from a local folder or ``.safetensors`` file, offline.

    The architecture always comes from ``spec.config`` (the run config), never from the folder;
    a folder whose ``config.json`` describes another architecture is refused.

    Raises:
        CheckpointError: path missing, wrong kind of file, another architecture, missing
            weights (other than new output norms), shape mismatches, or unused trunk weights.
    """
    path = Path(pretrained).expanduser()
    if path.is_dir():
        _check_folder_config(path, spec, what)
        return _from_pretrained(spec, path, source=path)
    if path.is_file() and path.suffix == ".safetensors":
        # from_pretrained wants a folder: give it one holding just this file (the run config is
        # passed explicitly), so Hub-style tensor names get the same renaming as folders do.
        with tempfile.TemporaryDirectory() as tmp:
            os.symlink(path.resolve(), Path(tmp) / "model.safetensors")
            return _from_pretrained(spec, Path(tmp), source=path)
    if not path.exists():
        raise CheckpointError(f"{path}: pretrained weights not found")
    raise CheckpointError(f"{path}: expected a save_pretrained folder or a .safetensors file")


def _check_folder_config(folder: Path, spec: HFSpec, what: str) -> None:
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        return  # weights only: the tensor checks below decide
    theirs = json_loads(read_text(cfg_file, error=CheckpointError, kind="JSON file"),
                        str(cfg_file))
    if not isinstance(theirs, dict):
        raise CheckpointError(f"{cfg_file}: not a model config (top level is not a mapping)")
    ours = spec.config
    if theirs.get("model_type") not in (None, ours.model_type):
        raise CheckpointError(f"{folder}: holds a {theirs['model_type']} model, the config asks "
                              f"for {what} ({ours.model_type})")
    for key in spec.arch:
        if key in theirs and _plain(theirs[key]) != _plain(getattr(ours, key)):
            raise CheckpointError(f"{cfg_file}: {key}={theirs[key]}, but {what} has "
                                  f"{key}={_plain(getattr(ours, key))}")


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


def _from_pretrained(spec: HFSpec, folder: Path, source: Path) -> nn.Module:
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # problems are reported below, in one line
    try:
        model, info = spec.model_class.from_pretrained(
            str(folder), config=spec.config, local_files_only=True, output_loading_info=True,
            ignore_mismatched_sizes=True)  # reported below, with the tensor's name
    except Exception as e:  # noqa: BLE001 -- a user file: any failure is reported in one line
        raise CheckpointError(f"{source}: cannot load {spec.config.model_type} weights "
                              f"({one_line(e)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        key = mismatched[0][0] if isinstance(mismatched[0], tuple) else mismatched[0]
        raise CheckpointError(f"{source}: does not fit the model: {len(mismatched)} tensors "
                              f"have another shape, e.g. {key}")
    allowed = _NEW_OUTPUT_NORMS + spec.encoder_class.unused_weights
    check_loading(model, source, info["missing_keys"], info["unexpected_keys"], allowed)
    fresh = sorted(k for k in info["missing_keys"] if k.startswith(_NEW_OUTPUT_NORMS))
    if fresh:
        log.info("%s: %d output-norm weights not in the checkpoint, newly initialised",
                 source, len(fresh))
    return model
