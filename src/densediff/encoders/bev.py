"""The BEV encoder: camera features (and LiDAR points) -> fused BEV features on the feature grid.

BEVFusion's structure in plain PyTorch, without sparse-conv or voxelisation extensions:

- camera branch: :class:`~densediff.encoders.lss.LSSTransform` on the stride-``camera_stride``
  camera features (the image encoder + neck run outside, once per camera);
- LiDAR branch (``C+L``): :class:`PillarEncoder`, points -> per-point features -> max over each
  pillar (a column of the feature grid) -> two 3x3 convs. BEVFusion voxelises at 0.1 m and
  runs a sparse 3-D SECOND backbone; pillars (PointPillars, Lang et al. 2019) keep this pure
  PyTorch at the cost of vertical detail, which the map classes (all on the ground) need least;
- fuser: concat -> 3x3 conv -> BN -> ReLU (BEVFusion ``ConvFuser``), camera-only models use the
  same layer on the camera features alone;
- BEV backbone: ``bev_blocks`` residual 3x3 blocks (BEVFusion: SECOND + SECONDFPN).
"""

from __future__ import annotations

import torch
from torch import nn

from densediff.encoders.lss import LSSTransform
from densediff.utils.grid import BEVGrid

__all__ = ["BEVEncoder", "PillarEncoder"]


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class _ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(channels, channels),
                                  nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class PillarEncoder(nn.Module):
    """LiDAR points -> B x C x X x Y pillar features on ``grid``.

    Each point is described by (x, y, z, intensity, time lag, its offset from the mean of the
    points in its pillar (3), its offset from the pillar centre (2)); a linear layer + LayerNorm +
    ReLU embeds it, a max over the points of each pillar pools it (empty pillars are 0), and two
    3x3 convs follow. Points outside the grid or ``zbound`` are dropped.
    """

    in_features = 10

    def __init__(self, channels: int, grid: BEVGrid, zbound: tuple[float, float]):
        super().__init__()
        self.grid, self.zbound, self.channels = grid, tuple(zbound), channels
        # BatchNorm on the raw features first: point coordinates (metres), intensities (0-255 in
        # nuScenes) and time lags (seconds) live on very different scales
        self.embed = nn.Sequential(nn.BatchNorm1d(self.in_features, affine=False),
                                   nn.Linear(self.in_features, channels), nn.LayerNorm(channels),
                                   nn.ReLU(inplace=True))
        self.convs = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, points: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``points`` B x P x 5 (x, y, z, intensity, time lag); ``mask`` B x P marks real points
        (None: all)."""
        b = points.shape[0]
        nx, ny = self.grid.shape
        cell, keep, ix, iy = self.grid.flat_cells(points[..., :3], self.zbound, mask)
        pts = points[keep].float()
        n_cells = b * nx * ny
        count = pts.new_zeros(n_cells).index_add_(0, cell, torch.ones_like(pts[:, 0]))
        mean = pts.new_zeros(n_cells, 3).index_add_(0, cell, pts[:, :3]) / count.clamp(min=1)[:, None]
        (sx, sy), (lx, ly) = self.grid.step, self.grid.low
        centre = torch.stack([lx + (ix[keep] + 0.5) * sx, ly + (iy[keep] + 0.5) * sy], -1)
        feats = self.embed(torch.cat([pts, pts[:, :3] - mean[cell], pts[:, :2] - centre], -1))
        pooled = feats.new_zeros(n_cells, self.channels).scatter_reduce_(
            0, cell[:, None].expand(-1, self.channels), feats, "amax", include_self=False)
        bev = pooled.view(b, nx, ny, self.channels).permute(0, 3, 1, 2).contiguous()
        return self.convs(bev)


class BEVEncoder(nn.Module):
    """Camera features (+ LiDAR points) -> B x ``fused_channels`` x X x Y on ``grid``.

    Args:
        camera_in: channels of the camera features handed to :meth:`forward`.
        camera_channels: channels of the lifted camera BEV features.
        lidar_channels: pillar feature channels, or None for a camera-only model.
        fused_channels: output channels.
        bev_blocks: residual blocks after the fuser.
        grid, dbound, zbound: the BEV feature grid, the depth bins, the height range.
    """

    def __init__(self, camera_in: int, camera_channels: int, lidar_channels: int | None,
                 fused_channels: int, bev_blocks: int, grid: BEVGrid,
                 dbound: tuple[float, float, float], zbound: tuple[float, float]):
        super().__init__()
        self.out_channels = fused_channels
        self.camera = LSSTransform(camera_in, camera_channels, dbound, zbound, grid)
        self.lidar = (PillarEncoder(lidar_channels, grid, zbound) if lidar_channels is not None
                      else None)
        fuse_in = camera_channels + (lidar_channels or 0)
        self.fuser = _conv_bn(fuse_in, fused_channels)
        self.blocks = nn.Sequential(*[_ResBlock(fused_channels) for _ in range(bev_blocks)])

    def forward(self, camera_feat: torch.Tensor, image_size: tuple[int, int],
                intrinsics: torch.Tensor, cam2ego: torch.Tensor,
                points: torch.Tensor | None = None, points_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        x = self.camera(camera_feat, image_size, intrinsics, cam2ego)
        if self.lidar is not None:
            if points is None:
                raise ValueError("this is a camera+LiDAR model: the inputs need 'points' "
                                 "(set data.bev.lidar: true)")
            x = torch.cat([x, self.lidar(points, points_mask)], 1)
        return self.blocks(self.fuser(x))
