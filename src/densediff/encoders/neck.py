"""The DDP neck: mmseg ``FPN`` followed by DDP's ``MultiStageMerging``.

FPN (Lin et al. 2017, as in mmseg with ``num_outs=4``): 1x1 lateral convs, top-down pathway
(nearest upsampling to the finer map's size + add), 3x3 output convs; every conv is an mmcv
``ConvModule`` with GroupNorm and no activation (so no conv bias). MultiStageMerging: resize
the 4 FPN maps bilinearly to the stride-4 size, concatenate (4C channels), 1x1 conv + GN -> C.
Output: one ``B x C x H/4 x W/4`` map, the condition of every decoder in this package.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from densediff.errors import ConfigError


class ConvGN(nn.Sequential):
    """Conv (no bias) + GroupNorm, no activation: mmcv ``ConvModule(norm_cfg=GN, act_cfg=None)``."""

    def __init__(self, cin: int, cout: int, kernel_size: int, num_groups: int):
        super().__init__(nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.GroupNorm(num_groups, cout))


class FPNMerge(nn.Module):
    """FPN + multi-stage merging -> one stride-4 feature map.

    Args:
        in_channels: channels of the 4 encoder levels (strides 4, 8, 16, 32).
        channels: FPN and output channels C (DDP: 256).
        num_groups: GroupNorm groups (DDP: 32); must divide ``channels``.

    Shapes: list of ``B x in_channels[i] x H_i x W_i`` -> ``B x C x H_0 x W_0``.
    """

    def __init__(self, in_channels: Sequence[int], channels: int = 256, num_groups: int = 32):
        super().__init__()
        if channels % num_groups:
            raise ConfigError(f"model.neck.num_groups: {num_groups} does not divide "
                              f"model.neck.channels={channels}")
        self.channels = channels
        self.lateral_convs = nn.ModuleList(ConvGN(c, channels, 1, num_groups) for c in in_channels)
        self.fpn_convs = nn.ModuleList(ConvGN(channels, channels, 3, num_groups)
                                       for _ in in_channels)
        self.merge = ConvGN(len(in_channels) * channels, channels, 1, num_groups)
        # mmseg FPN: Xavier-uniform convs; the merging ConvModule: Kaiming-normal (fan_out).
        for conv_gn in [*self.lateral_convs, *self.fpn_convs]:
            nn.init.xavier_uniform_(conv_gn[0].weight)
        nn.init.kaiming_normal_(self.merge[0].weight, mode="fan_out", nonlinearity="relu")

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [F.interpolate(x, size=size, mode="bilinear", align_corners=False)
                            for x in outs[1:]]
        return self.merge(torch.cat(outs, dim=1))
