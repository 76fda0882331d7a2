"""Ground-plane grids of the BEV task, shared by data, encoders, decoders and models.

- :class:`BEVGrid`: an ego-frame grid (x forward, y left; tensors are ``... x X x Y``, index
  ``[ix, iy]`` covers ``x in [xlo + ix step, xlo + (ix + 1) step)``).
- :func:`output_grid`, :func:`feature_grid`: the label and feature grids of a
  ``data.bev`` config section.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from densediff.config import BEVDataConfig

__all__ = ["BEVGrid", "feature_grid", "output_grid"]


@dataclass(frozen=True)
class BEVGrid:
    """A regular grid on the ground plane: ``xbound``/``ybound`` are (low, high, step) in
    metres."""

    xbound: tuple[float, float, float]
    ybound: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int]:
        """(X, Y) cells."""
        return tuple(int(round((b[1] - b[0]) / b[2])) for b in (self.xbound, self.ybound))

    @property
    def step(self) -> tuple[float, float]:
        return self.xbound[2], self.ybound[2]

    @property
    def low(self) -> tuple[float, float]:
        return self.xbound[0], self.ybound[0]

    def cell_of(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer cell indices (ix, iy) of points; out-of-grid points get indices outside
        ``[0, X) x [0, Y)``."""
        return (torch.floor((x - self.xbound[0]) / self.xbound[2]).long(),
                torch.floor((y - self.ybound[0]) / self.ybound[2]).long())

    def flat_cells(self, points: torch.Tensor, zbound: tuple[float, float],
                   mask: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cells of B x M x 3 points: ``(flat, keep, ix, iy)`` where ``keep`` (B x M) marks the
        points inside the grid, with z in ``zbound`` (and ``mask``), and ``flat`` is the index
        ``(b X + ix) Y + iy`` of each kept point's cell in a B x X x Y array."""
        b, m = points.shape[:2]
        nx, ny = self.shape
        ix, iy = self.cell_of(points[..., 0], points[..., 1])
        z = points[..., 2]
        keep = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny) & (z >= zbound[0]) & (z < zbound[1])
        if mask is not None:
            keep &= mask
        batch = torch.arange(b, device=points.device)[:, None].expand(b, m)
        return ((batch * nx + ix) * ny + iy)[keep], keep, ix, iy

    def centres(self) -> tuple[np.ndarray, np.ndarray]:
        """Cell-centre coordinates: x (X,) and y (Y,)."""
        (nx, ny), (sx, sy), (lx, ly) = self.shape, self.step, self.low
        return lx + (np.arange(nx) + 0.5) * sx, ly + (np.arange(ny) + 0.5) * sy

    def extent(self) -> tuple[float, float, float, float]:
        """(x_low, x_high, y_low, y_high) of the covered area."""
        (nx, ny), (sx, sy), (lx, ly) = self.shape, self.step, self.low
        return lx, lx + nx * sx, ly, ly + ny * sy


def output_grid(bev: BEVDataConfig) -> BEVGrid:
    """The label grid (``xbound``/``ybound``)."""
    return BEVGrid(tuple(bev.xbound), tuple(bev.ybound))


def feature_grid(bev: BEVDataConfig) -> BEVGrid:
    """The BEV feature grid (``feat_xbound``/``feat_ybound``)."""
    return BEVGrid(tuple(bev.feat_xbound), tuple(bev.feat_ybound))
