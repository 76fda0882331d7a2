"""A small residual CNN, fast on CPU: for tests, the CPU demo and quick experiments.

Layout (ResNet-like, BatchNorm + ReLU): a stride-2 3x3 stem conv, then four stages, each a
stride-2 3x3 conv followed by ``blocks`` basic residual blocks, giving strides 4, 8, 16, 32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from densediff.config import EncoderConfig
from densediff.encoders.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    load_checked,
    read_state_dict,
)
from densediff.errors import ConfigError

VARIANTS: dict[str, dict] = {
    "tiny": dict(widths=(16, 32, 64, 128), blocks=(1, 1, 1, 1)),  # ~0.5 M parameters
    "small": dict(widths=(32, 64, 96, 160), blocks=(1, 1, 1, 1)),  # ~0.9 M parameters
}


def conv_bn_relu(cin: int, cout: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    """3x3 conv (no bias) + BatchNorm (+ ReLU)."""
    layers = [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut (ResNet basic block)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn_relu(channels, channels),
                                  conv_bn_relu(channels, channels, relu=False))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class SimpleCNN(Encoder):
    """Small residual CNN encoder.

    Args:
        widths: channels of the four levels.
        blocks: residual blocks per stage.
        **encoder_kwargs: passed to :class:`Encoder` (frozen, data_mean, data_std).
    """

    def __init__(self, widths: Sequence[int], blocks: Sequence[int], **encoder_kwargs):
        super().__init__(out_channels=widths, **encoder_kwargs)
        self.stem = conv_bn_relu(3, widths[0] // 2, stride=2)
        cins = [widths[0] // 2, *widths[:-1]]
        self.stages = nn.ModuleList(
            nn.Sequential(conv_bn_relu(cin, cout, stride=2), *(BasicBlock(cout) for _ in range(n)))
            for cin, cout, n in zip(cins, widths, blocks))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # Zero-init the last BN of each residual branch: blocks start as identities.
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.body[-1][1].weight)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


def build_simple_cnn(enc_cfg: EncoderConfig, data_mean=IMAGENET_MEAN,
                     data_std=IMAGENET_STD) -> SimpleCNN:
    """Build from an :class:`~densediff.config.EncoderConfig`; ``pretrained`` is a
    ``.safetensors`` state dict of this module. ``frozen`` is applied by ``build_encoder``."""
    if enc_cfg.variant not in VARIANTS:
        raise ConfigError(f"model.encoder.variant: simple_cnn has no variant "
                          f"{enc_cfg.variant!r} (choose from {', '.join(VARIANTS)})")
    if enc_cfg.drop_path:
        raise ConfigError("model.encoder.drop_path: simple_cnn has no stochastic depth; "
                          "set it to 0")
    encoder = SimpleCNN(**VARIANTS[enc_cfg.variant], data_mean=data_mean, data_std=data_std)
    if enc_cfg.pretrained:
        load_checked(encoder, read_state_dict(enc_cfg.pretrained), enc_cfg.pretrained)
    return encoder
