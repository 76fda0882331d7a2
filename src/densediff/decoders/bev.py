"""Resampling BEV features from the feature grid onto the output grid (BEVFusion
``BEVGridTransform``, which the official DDP BEV head applies before its deformable layers)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from densediff.utils.grid import BEVGrid

__all__ = ["BEVGridTransform", "Resampled"]


class BEVGridTransform(nn.Module):
    """B x C x X x Y features on ``source`` -> B x C x X' x Y' on ``target``, bilinear at the
    target cell centres (zeros outside the source grid)."""

    def __init__(self, source: BEVGrid, target: BEVGrid):
        super().__init__()
        x0, x1, y0, y1 = source.extent()
        cx, cy = target.centres()
        # grid_sample with align_corners=False: -1 / +1 are the outer edges of the source grid.
        u = torch.as_tensor((cx - x0) / (x1 - x0) * 2 - 1, dtype=torch.float32)
        v = torch.as_tensor((cy - y0) / (y1 - y0) * 2 - 1, dtype=torch.float32)
        uu, vv = torch.meshgrid(u, v, indexing="ij")  # X' x Y'
        # grid[..., 0] indexes the last dim (Y), grid[..., 1] the one before (X)
        self.register_buffer("grid", torch.stack([vv, uu], -1)[None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.grid.to(x.dtype).expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, g, mode="bilinear", padding_mode="zeros", align_corners=False)


class Resampled(nn.Module):
    """``head(transform(x), *args)``: a map decoder run on resampled BEV features."""

    def __init__(self, transform: nn.Module, head: nn.Module):
        super().__init__()
        self.transform, self.head = transform, head

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        return self.head(self.transform(x), *args)
