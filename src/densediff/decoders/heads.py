"""Discriminative segmentation heads (mmseg style).

Both follow mmseg's ``FCNHead`` / ``BaseDecodeHead``: 3x3 ``ConvModule`` s (conv without bias,
BatchNorm, ReLU; Kaiming-normal fan_out init), ``Dropout2d``, then a 1x1 classifier
(``conv_seg``, normal init std 0.01). They use plain BatchNorm; the engine may convert it to
SyncBatchNorm under DistributedDataParallel.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    """mmcv ``ConvModule(cin, cout, 3, padding=1, norm_cfg=BN)`` with its default init."""
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ConvHead(nn.Module):
    """``num_convs`` x (3x3 conv, BN, ReLU), dropout, 1x1 classifier.

    Args:
        in_channels: input channels.
        channels: channels of the 3x3 convs.
        num_convs: number of 3x3 conv layers (0: classifier directly on the input).
        num_classes: K.
        dropout: ``Dropout2d`` probability before the classifier (0 disables it).
        out_kernel: kernel of the classifier conv (1, or 3 as the official depth head).

    Shapes: ``B x in_channels x h x w`` -> ``B x K x h x w`` logits.
    """

    def __init__(self, in_channels: int, channels: int, num_convs: int, num_classes: int,
                 dropout: float = 0.1, out_kernel: int = 1):
        super().__init__()
        cins = [in_channels] + [channels] * (num_convs - 1)
        self.convs = nn.Sequential(*(conv_bn_relu(c, channels) for c in cins[:num_convs]))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels if num_convs else in_channels, num_classes, out_kernel,
                                  padding=out_kernel // 2)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(self.convs(x)))


class FCNHead(ConvHead):
    """mmseg ``FCNHead`` with ``num_convs=1, concat_input=False`` (DDP's auxiliary head)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__(in_channels, channels, 1, num_classes, dropout)
