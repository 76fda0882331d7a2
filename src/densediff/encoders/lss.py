"""Camera -> BEV view transform in the Lift-Splat-Shoot manner (Philion & Fidler, ECCV 2020), as
BEVFusion's ``LSSTransform``, in plain PyTorch.

1. **Lift**: a 1x1 conv on each camera's features predicts a distribution over D depth bins
   and C context channels; their outer product places ``p(d) * context`` at every
   (depth bin, feature cell) of the camera frustum (:class:`LSSTransform`).
2. **Geometry**: every frustum point (pixel centre (u, v) of a feature cell, bin-centre depth
   d) is un-projected with the camera's intrinsics and moved into the ego frame with its
   extrinsics (:func:`lift_points`): ``p = R K^-1 (u d, v d, d) + t``.
3. **Splat**: points inside the grid (and the height range) are summed into their BEV cell
   (:func:`bev_pool`: one ``index_add_`` over all points of all cameras and images; BEVFusion's
   CUDA ``bev_pool`` does the same sum).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from densediff.utils.grid import BEVGrid

__all__ = ["LSSTransform", "bev_pool", "depth_bins", "frustum", "lift_points", "splat"]


def depth_bins(dbound: tuple[float, float, float]) -> torch.Tensor:
    """Bin-centre depths of ``dbound`` (low, high, step): D = round((high - low) / step)."""
    lo, hi, step = dbound
    n = int(round((hi - lo) / step))
    return lo + (torch.arange(n, dtype=torch.float32) + 0.5) * step


def frustum(image_size: tuple[int, int], feat_size: tuple[int, int],
            dbound: tuple[float, float, float]) -> torch.Tensor:
    """D x h x w x 3 frustum points (u, v, d): the image-pixel centre of every feature cell
    (pixel i spans [i, i + 1), so cell j of w covers pixels [j W/w, (j + 1) W/w)) at every
    bin-centre depth."""
    (ih, iw), (fh, fw) = image_size, feat_size
    d = depth_bins(dbound)
    v = (torch.arange(fh, dtype=torch.float32) + 0.5) * ih / fh
    u = (torch.arange(fw, dtype=torch.float32) + 0.5) * iw / fw
    dd, vv, uu = torch.meshgrid(d, v, u, indexing="ij")
    return torch.stack([uu, vv, dd], -1)


def lift_points(frustum_pts: torch.Tensor, intrinsics: torch.Tensor, cam2ego: torch.Tensor
                ) -> torch.Tensor:
    """Frustum points (D x h x w x 3 of (u, v, d)) -> ego-frame points B x N x D x h x w x 3
    for intrinsics B x N x 3 x 3 and camera-to-ego transforms B x N x 4 x 4."""
    uvd = frustum_pts
    pix = torch.cat([uvd[..., :2] * uvd[..., 2:], uvd[..., 2:]], -1)  # (u d, v d, d)
    m = cam2ego[..., :3, :3] @ torch.linalg.inv(intrinsics)  # B x N x 3 x 3
    pts = torch.einsum("bnij,dhwj->bndhwi", m, pix)
    return pts + cam2ego[..., None, None, None, :3, 3]


def bev_pool(feats: torch.Tensor, points: torch.Tensor, grid: BEVGrid,
             zbound: tuple[float, float]) -> torch.Tensor:
    """Sum point features into BEV cells.

    Args:
        feats: B x M x C features of M points per sample.
        points: B x M x 3 ego-frame positions.
        grid: the BEV grid; points outside it, or with z outside ``zbound``, are dropped.

    Returns:
        B x C x X x Y sums.
    """
    flat, keep, _, _ = grid.flat_cells(points, zbound)
    return splat(feats[keep], flat, feats.shape[0], grid.shape)


def splat(feats: torch.Tensor, flat: torch.Tensor, batch: int, shape: tuple[int, int]
          ) -> torch.Tensor:
    """Sum M x C point features into the B x C x X x Y cells ``flat`` (M indices
    ``(b X + x) Y + y``); empty cells are 0."""
    nx, ny = shape
    out = feats.new_zeros(batch * nx * ny, feats.shape[-1]).index_add_(0, flat, feats)
    return out.view(batch, nx, ny, -1).permute(0, 3, 1, 2).contiguous()


class LSSTransform(nn.Module):
    """Per-camera features -> BEV features (see the module docstring).

    Args:
        in_channels: channels of the camera features.
        channels: C, the lifted context channels (BEVFusion 80).
        dbound: depth bins (low, high, step).
        zbound: pooled height range.
        grid: the BEV feature grid.
    """

    def __init__(self, in_channels: int, channels: int, dbound: tuple[float, float, float],
                 zbound: tuple[float, float], grid: BEVGrid):
        super().__init__()
        self.channels, self.grid, self.zbound = channels, grid, tuple(zbound)
        self.dbound = tuple(dbound)
        self.depth = len(depth_bins(self.dbound))
        self.depthnet = nn.Conv2d(in_channels, self.depth + channels, 1)

    def depth_distribution(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(BN) x Cin x h x w -> (depth probabilities (BN) x D x h x w, context (BN) x C x h x w)."""
        x = self.depthnet(feat)
        return x[:, :self.depth].softmax(1), x[:, self.depth:]

    def forward(self, feat: torch.Tensor, image_size: tuple[int, int], intrinsics: torch.Tensor,
                cam2ego: torch.Tensor) -> torch.Tensor:
        """Camera features (B N) x Cin x h x w of images of ``image_size`` (H, W), intrinsics
        B x N x 3 x 3, cam2ego B x N x 4 x 4 -> B x C x X x Y."""
        b = intrinsics.shape[0]
        fr = frustum(image_size, tuple(feat.shape[-2:]), self.dbound).to(feat.device)
        depth, ctx = self.depth_distribution(feat)
        vol = depth[:, :, None] * ctx[:, None]  # (BN) x D x C x h x w
        vol = vol.permute(0, 1, 3, 4, 2).reshape(b, -1, self.channels)  # B x (N D h w) x C
        pts = lift_points(fr, intrinsics.float(), cam2ego.float())
        return bev_pool(vol, pts.reshape(b, -1, 3), self.grid, self.zbound)


def camera_features(feat: torch.Tensor, stride: int, base_stride: int = 4) -> torch.Tensor:
    """Average-pool stride-``base_stride`` features to ``stride``."""
    k = stride // base_stride
    return F.avg_pool2d(feat, k) if k > 1 else feat
