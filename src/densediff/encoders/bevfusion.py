"""The camera-to-BEV encoder of the official DDP BEV models (BEVFusion's camera stream, as the
released ``ddp-camera-bev256d2-lss-scale001-d5-lr5e-5`` uses it), in plain PyTorch.

``model.bev.arch: bevfusion`` builds it; its parameter layout is the official one, so the
released checkpoint converts name by name (:func:`densediff.official.mapping.bev_rules`).

1. :class:`CameraFPN` (BEVFusion ``GeneralizedLSSFPN``): the encoder's stride 8/16/32 levels,
   top-down: upsample the coarser map bilinearly (``align_corners=False``) to the finer one,
   concatenate, 1x1 conv, 3x3 conv (each conv -> BN -> ReLU); output: the stride-8 map.
2. :class:`DepthLift` (BEVFusion ``LSSTransform`` with ``downsample``): a 1x1 conv predicts D
   depth logits (softmax) and C context channels; their outer product is splatted into a BEV
   grid ``downsample`` times finer than the feature grid, then three 3x3 conv -> BN -> ReLU
   (the middle one with stride ``downsample``) bring it to the feature grid. Its geometry
   follows the official code, which differs from :class:`~densediff.encoders.lss.LSSTransform`:

   - frustum: depths ``arange(low, high, step)`` (bin starts, not centres); pixel positions
     ``linspace(0, W - 1, w)`` and ``linspace(0, H - 1, h)`` (not cell centres);
   - a point's cell is ``trunc((p - low) / step)`` (``.long()``, rounding toward zero), so a
     point up to one cell *below* the grid's low edge lands in cell 0 (also in z, whose
     single cell spans ``zbound``); then cells outside ``[0, n)`` are dropped;
   - the splat sums the points of a cell (the CUDA ``bev_pool`` kernel), here by
     :func:`~densediff.encoders.lss.splat`.
3. :func:`residual_stages` + :class:`UpFuse` (BEVFusion ``GeneralizedResNet`` + ``LSSFPN``):
   residual stages (basic blocks, 3x3 convs, a 1x1 conv + BN shortcut where the shape
   changes), then the last stage upsampled bilinearly (``align_corners=True``) to the first
   stage's size, concatenated with it, 1x1 + 3x3 conv -> BN -> ReLU, and upsampled
   x``scale`` back to the feature grid (bilinear, ``align_corners=True``, then 3x3 conv ->
   BN -> ReLU).

The camera + LiDAR model's LiDAR branch, fuser and SECOND decoder are in
:mod:`densediff.encoders.bevfusion_lidar`; :class:`BEVFusionView` composes either.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from densediff.encoders.lss import lift_points, splat
from densediff.utils.grid import BEVGrid

__all__ = ["BEVFusionView", "CameraFPN", "DepthLift", "ResidualStages", "official_frustum",
           "residual_stages"]


class ConvBNReLU(nn.Module):
    """conv (no bias) -> BatchNorm -> ReLU; parameters ``conv``, ``bn`` (mmcv ConvModule)."""

    def __init__(self, cin: int, cout: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


def _conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class CameraFPN(nn.Module):
    """The last ``len(in_channels)`` encoder levels -> one ``out_channels`` map at the finest of
    them (see the module docstring, step 1).

    Args:
        in_channels: channels of the levels used (official: 192, 384, 768, strides 8/16/32).
        out_channels: output channels (official 256).
        stride: the stride of the finest level used (read by the BEV model: no pooling after).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, stride: int = 8):
        super().__init__()
        n = len(in_channels)
        if n < 2:
            raise ValueError("CameraFPN needs at least 2 levels")
        self.levels, self.stride, self.out_channels = n, stride, out_channels
        self.lateral_convs = nn.ModuleList(
            ConvBNReLU(in_channels[i] + (in_channels[i + 1] if i == n - 2 else out_channels),
                       out_channels, 1) for i in range(n - 1))
        self.fpn_convs = nn.ModuleList(ConvBNReLU(out_channels, out_channels, 3)
                                       for _ in range(n - 1))

    def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        x = list(levels[-self.levels:])
        for i in range(self.levels - 2, -1, -1):
            up = F.interpolate(x[i + 1], size=x[i].shape[-2:], mode="bilinear",
                               align_corners=False)
            x[i] = self.fpn_convs[i](self.lateral_convs[i](torch.cat([x[i], up], 1)))
        return x[0]


def official_frustum(image_size: tuple[int, int], feat_size: tuple[int, int],
                     dbound: tuple[float, float, float]) -> torch.Tensor:
    """D x h x w x 3 frustum points (u, v, d) of BEVFusion: ``d`` in ``arange(*dbound)``,
    ``u`` in ``linspace(0, W - 1, w)``, ``v`` in ``linspace(0, H - 1, h)``."""
    (ih, iw), (fh, fw) = image_size, feat_size
    d = torch.arange(*dbound, dtype=torch.float32)
    v = torch.linspace(0, ih - 1, fh, dtype=torch.float32)
    u = torch.linspace(0, iw - 1, fw, dtype=torch.float32)
    dd, vv, uu = torch.meshgrid(d, v, u, indexing="ij")
    return torch.stack([uu, vv, dd], -1)


class DepthLift(nn.Module):
    """Camera features -> BEV features on ``grid`` (see the module docstring, step 2).

    Args:
        in_channels: channels of the camera features.
        channels: C, the lifted channels (official 80).
        dbound: depth bins (low, high, step); D = ``len(arange(*dbound))`` (official 118).
        zbound: the pooled height range (one cell).
        grid: the BEV grid of the output; the splat grid is ``downsample`` times finer.
        downsample: 1 or 2.
    """

    def __init__(self, in_channels: int, channels: int, dbound: tuple[float, float, float],
                 zbound: tuple[float, float], grid: BEVGrid, downsample: int = 2):
        super().__init__()
        self.channels, self.dbound, self.zbound = channels, tuple(dbound), tuple(zbound)
        self.depth = len(torch.arange(*self.dbound))
        (x0, _, sx), (y0, _, sy) = grid.xbound, grid.ybound
        nx, ny = grid.shape
        self.shape = (nx * downsample, ny * downsample)
        step = (sx / downsample, sy / downsample, zbound[1] - zbound[0])
        # the official cell origin, in float32 as it computes it: (low + step / 2) - step / 2
        centre = torch.tensor([x0 + step[0] / 2, y0 + step[1] / 2, zbound[0] + step[2] / 2])
        self.register_buffer("step", torch.tensor(step), persistent=False)
        self.register_buffer("origin", centre - torch.tensor(step) / 2, persistent=False)
        self.depthnet = nn.Conv2d(in_channels, self.depth + channels, 1)
        self.downsample = (nn.Sequential(*_conv_bn_relu(channels, channels),
                                         *_conv_bn_relu(channels, channels, stride=downsample),
                                         *_conv_bn_relu(channels, channels))
                           if downsample > 1 else nn.Identity())

    def lift(self, feat: torch.Tensor) -> torch.Tensor:
        """(B N) x Cin x h x w -> (B N) x D x h x w x C: p(d) * context."""
        x = self.depthnet(feat)
        depth = x[:, :self.depth].softmax(1)
        vol = depth[:, None] * x[:, self.depth:self.depth + self.channels, None]
        return vol.permute(0, 2, 3, 4, 1)

    def cells(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """B x M x 3 points -> (flat cell indices of the kept points, keep mask B x M)."""
        nx, ny = self.shape
        idx = ((points - self.origin) / self.step).long()  # truncation, as the official
        keep = ((idx[..., 0] >= 0) & (idx[..., 0] < nx) & (idx[..., 1] >= 0)
                & (idx[..., 1] < ny) & (idx[..., 2] == 0))
        batch = torch.arange(points.shape[0], device=points.device)[:, None].expand_as(keep)
        return ((batch * nx + idx[..., 0]) * ny + idx[..., 1])[keep], keep

    def splatted(self, feat: torch.Tensor, image_size: tuple[int, int],
                 intrinsics: torch.Tensor, cam2ego: torch.Tensor) -> torch.Tensor:
        """The BEV features before ``downsample``: B x C x (X d) x (Y d)."""
        b = intrinsics.shape[0]
        fr = official_frustum(image_size, tuple(feat.shape[-2:]), self.dbound).to(feat.device)
        pts = lift_points(fr, intrinsics.float(), cam2ego.float()).reshape(b, -1, 3)
        vol = self.lift(feat.float()).reshape(b, -1, self.channels)
        flat, keep = self.cells(pts)
        return splat(vol[keep], flat, b, self.shape)

    def forward(self, feat: torch.Tensor, image_size: tuple[int, int], intrinsics: torch.Tensor,
                cam2ego: torch.Tensor) -> torch.Tensor:
        """Camera features (B N) x Cin x h x w of images of ``image_size``, intrinsics
        B x N x 3 x 3, cam2ego B x N x 4 x 4 -> B x C x X x Y on the feature grid."""
        return self.downsample(self.splatted(feat, image_size, intrinsics, cam2ego))


class BasicBlock(nn.Module):
    """Two 3x3 conv -> BN (ReLU between and after the residual sum); a 1x1 conv + BN shortcut
    when the stride or the channels change (mmcv ``BasicBlock`` names)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                         nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class UpFuse(nn.Module):
    """BEVFusion ``LSSFPN``: the last stage resized to the first, concatenated, fused and
    upsampled by ``scale`` (see the module docstring, step 3)."""

    def __init__(self, in_channels: tuple[int, int], out_channels: int, scale: int):
        super().__init__()
        self.fuse = nn.Sequential(*_conv_bn_relu(sum(in_channels), out_channels, 1),
                                  *_conv_bn_relu(out_channels, out_channels))
        self.upsample = (nn.Sequential(nn.Upsample(scale_factor=scale, mode="bilinear",
                                                   align_corners=True),
                                       *_conv_bn_relu(out_channels, out_channels))
                         if scale > 1 else nn.Identity())

    def forward(self, stages: Sequence[torch.Tensor]) -> torch.Tensor:
        last = F.interpolate(stages[-1], size=stages[0].shape[-2:], mode="bilinear",
                             align_corners=True)
        return self.upsample(self.fuse(torch.cat([last, stages[0]], 1)))


class ResidualStages(nn.ModuleList):
    """Stages applied in turn; returns every stage's output (parameters ``<stage>.<block>``)."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for stage in self:
            x = stage(x)
            out.append(x)
        return out


def residual_stages(in_channels: int, channels: Sequence[int], strides: Sequence[int],
                    blocks: int) -> ResidualStages:
    """BEVFusion ``GeneralizedResNet``: one stage of ``blocks`` :class:`BasicBlock` per entry
    of ``channels`` (official 160, 320, 640 with strides 2, 2, 1 and 2 blocks each)."""
    stages, cin = [], in_channels
    for cout, stride in zip(channels, strides):
        stages.append(nn.Sequential(*(BasicBlock(cin if i == 0 else cout, cout,
                                                 stride if i == 0 else 1)
                                      for i in range(blocks))))
        cin = cout
    return ResidualStages(stages)


class BEVFusionView(nn.Module):
    """Camera features (the :class:`CameraFPN` map) [+ LiDAR points] -> BEV features on the
    feature grid: :class:`DepthLift` (``lift``); with LiDAR, the LiDAR BEV features
    (``lidar``, :class:`~densediff.encoders.bevfusion_lidar.LidarEncoder`) and the camera ones
    fused (``fuser``, ``concat(camera, lidar)``); then the BEV decoder: ``backbone`` (a module
    returning its stages' outputs: :func:`residual_stages` or
    :class:`~densediff.encoders.bevfusion_lidar.SECOND`) and ``neck`` (:class:`UpFuse` or
    :class:`~densediff.encoders.bevfusion_lidar.SECONDFPN`, stages -> one map). The ``view``
    of the BEV models under ``model.bev.arch: bevfusion``.

    Args:
        lift, backbone, neck: the modules above; out_channels: the neck's output channels;
        lidar, fuser: both or neither (camera only).
    """

    def __init__(self, lift: DepthLift, backbone: nn.Module, neck: nn.Module, out_channels: int,
                 lidar: nn.Module | None = None, fuser: nn.Module | None = None):
        super().__init__()
        if (lidar is None) != (fuser is None):
            raise ValueError("BEVFusionView: give both lidar and fuser, or neither")
        self.out_channels = out_channels
        self.lift, self.lidar, self.fuser = lift, lidar, fuser
        self.backbone, self.neck = backbone, neck

    def bev(self, feat: torch.Tensor, image_size: tuple[int, int], intrinsics: torch.Tensor,
            cam2ego: torch.Tensor, points: torch.Tensor | None = None,
            points_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's input: the camera BEV features, or the fused ones."""
        if (points is not None) != (self.lidar is not None):
            raise ValueError("this model is camera + LiDAR: the inputs need 'points' (set "
                             "data.bev.lidar: true)" if self.lidar is not None else
                             "this model is camera-only: set data.bev.lidar false")
        x = self.lift(feat, image_size, intrinsics, cam2ego)
        if self.lidar is not None:
            x = self.fuser([x, self.lidar(points, points_mask)])
        return x

    def forward(self, feat: torch.Tensor, image_size: tuple[int, int], intrinsics: torch.Tensor,
                cam2ego: torch.Tensor, points: torch.Tensor | None = None,
                points_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.bev(feat, image_size, intrinsics, cam2ego, points, points_mask)
        return self.neck(self.backbone(x))
