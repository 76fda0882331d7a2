"""The LiDAR branch, fuser and BEV decoder of the official DDP camera + LiDAR BEV model
(BEVFusion's, as the released ``ddp-fusion-bev256d2-lss-scale001-d5-lr5e-5`` uses them), in
plain PyTorch, without compiled ops.

``model.bev.arch: bevfusion`` with ``data.bev.lidar: true`` builds them; their parameter layout
is the official one (sparse-conv weights too: ``(k0, k1, k2, in, out)``, spconv 1.x), so the
released checkpoint converts name by name (:func:`densediff.official.mapping.bev_rules`).

1. :func:`voxelize` (BEVFusion ``Voxelization`` + ``voxelize_reduce``, "hard" voxels): a point's
   cell is ``floor((p - low) / size)`` in float32; points outside the grid are dropped; voxels
   are numbered in the order their first point appears; a voxel keeps its first
   ``max_points`` points (in point order) and at most ``max_voxels`` voxels are kept (the first
   ones); its feature is the mean of its kept points' features.
2. :class:`SparseEncoder` (BEVFusion/mmdet3d ``SparseEncoder``, ``block_type: basicblock``): on
   the active voxels only, with :class:`SparseConv3d`, a gather-based sparse convolution: the
   active coordinates are sorted once, and for each kernel offset the input neighbour of every
   output site is found by binary search and its features go through one matmul. Sites are
   ``(batch, x, y, z)`` on a ``(X, Y, Z)`` grid (``Z`` = the voxel grid's + 1, SECOND's
   convention). As spconv 1.x:

   - submanifold (``subm``): the output sites are the input sites; output ``o`` reads input
     ``o - padding + k`` for kernel offset ``k`` (inactive neighbours count as 0);
   - strided: output size ``(n + 2 padding - kernel) // stride + 1`` per axis; the output sites
     are all ``o`` with at least one active input at ``o * stride - padding + k``;

   so both equal a dense ``conv3d`` (zeros at inactive sites) read at the output sites.
   Layout: a submanifold 3x3x3 conv -> BN1d -> ReLU (``conv_input``), then per stage two
   :class:`SparseBasicBlock` (submanifold) and, except in the last stage, a stride-2 3x3x3
   conv -> BN -> ReLU with the stage's padding; then ``conv_out``: a (1, 1, 3) conv with stride
   (1, 1, 2) -> BN -> ReLU. The output is scattered into a dense ``B x C x X x Y x Z`` tensor
   and its heights are stacked into channels: ``B x (C Z) x X x Y`` (channel ``c * Z + z``).
3. :class:`ConvFuser`: ``concat(camera BEV, LiDAR BEV)`` -> 3x3 conv -> BN -> ReLU.
4. :class:`SECOND` + :class:`SECONDFPN` (the fusion model's BEV decoder): stages of a strided
   3x3 conv and ``layers`` 3x3 convs (each -> BN eps 1e-3 -> ReLU); each stage brought back to
   the first stage's input resolution (a 1x1 conv at stride 1, a transposed conv of kernel =
   stride otherwise) -> BN -> ReLU; the stages concatenated.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

__all__ = ["ConvFuser", "LidarEncoder", "SECOND", "SECONDFPN", "SparseBasicBlock",
           "SparseConv3d", "SparseEncoder", "SparseTensor", "voxel_grid", "voxelize"]

BN_EPS = 1e-3
"""The SparseEncoder's BN1d and SECOND's / SECONDFPN's BN epsilon (official configs)."""


def voxel_grid(point_range: Sequence[float], voxel_size: Sequence[float]) -> list[int]:
    """Voxels per axis, ``round((high - low) / size)`` in float32 (as the official op)."""
    f = dict(dtype=torch.float32, device="cpu")
    return torch.round((torch.tensor(point_range[3:], **f) - torch.tensor(point_range[:3], **f))
                       / torch.tensor(voxel_size, **f)).long().tolist()


def voxelize(points: torch.Tensor, point_range: Sequence[float], voxel_size: Sequence[float],
             max_points: int, max_voxels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One point cloud ``P x F`` (x, y, z first) -> (voxel features ``V x F``, the mean of
    their points; voxel coordinates ``V x 3`` (x, y, z) int64), see the module docstring."""
    pts = points.float()
    low = torch.tensor(point_range[:3], dtype=torch.float32, device=pts.device)
    size = torch.tensor(voxel_size, dtype=torch.float32, device=pts.device)
    grid = torch.tensor(voxel_grid(point_range, voxel_size), device=pts.device)
    cell = torch.floor((pts[:, :3] - low) / size).long()
    inside = ((cell >= 0) & (cell < grid)).all(1)
    idx = inside.nonzero()[:, 0]
    cell = cell[idx]
    if not len(idx):
        return pts.new_zeros(0, pts.shape[1]), cell.new_zeros(0, 3)
    key = (cell[:, 0] * grid[1] + cell[:, 1]) * grid[2] + cell[:, 2]
    uniq, inv = torch.unique(key, return_inverse=True)
    n = len(idx)
    first = torch.full((len(uniq),), n, dtype=torch.long, device=pts.device).scatter_reduce_(
        0, inv, torch.arange(n, device=pts.device), "amin")
    rank = torch.empty_like(first)
    rank[first.argsort()] = torch.arange(len(uniq), device=pts.device)
    vid = rank[inv]  # voxel number per point: order of first appearance
    order = torch.sort(vid, stable=True).indices
    counts = torch.bincount(vid, minlength=len(uniq))
    starts = counts.cumsum(0) - counts
    ordinal = torch.empty_like(vid)
    ordinal[order] = torch.arange(n, device=pts.device) - starts[vid[order]]
    take = (vid < max_voxels) & (ordinal < max_points)
    nvox = min(len(uniq), max_voxels)
    vt = vid[take]
    sums = pts.new_zeros(nvox, pts.shape[1]).index_add_(0, vt, pts[idx[take]])
    kept = torch.bincount(vt, minlength=nvox)
    coords = cell.new_zeros(nvox, 3)
    coords[vt] = cell[take]
    return sums / kept[:, None].to(sums.dtype), coords


class SparseTensor(NamedTuple):
    """Features ``N x C`` at ``coords`` ``N x 4`` (batch, x, y, z; int64) on a ``shape`` grid."""

    feats: torch.Tensor
    coords: torch.Tensor
    shape: tuple[int, int, int]
    batch: int

    def replace(self, feats: torch.Tensor) -> SparseTensor:
        return self._replace(feats=feats)

    def dense(self) -> torch.Tensor:
        """``B x C x X x Y x Z`` with zeros at inactive sites."""
        x, y, z = self.shape
        out = self.feats.new_zeros(self.batch, x, y, z, self.feats.shape[1])
        c = self.coords
        out[c[:, 0], c[:, 1], c[:, 2], c[:, 3]] = self.feats
        return out.permute(0, 4, 1, 2, 3)


def _keys(coords: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    x, y, z = shape
    return ((coords[:, 0] * x + coords[:, 1]) * y + coords[:, 2]) * z + coords[:, 3]


def _triple(v: int | Sequence[int]) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)


class SparseConv3d(nn.Module):
    """A sparse 3-D convolution (no bias), submanifold or strided, on :class:`SparseTensor`
    (see the module docstring); ``weight`` is ``(k0, k1, k2, in, out)``, spconv 1.x's layout.

    Args:
        cin, cout: channels; kernel, stride, padding: ints or (x, y, z) triples;
        subm: submanifold (output sites = input sites; stride must be 1).
    """

    def __init__(self, cin: int, cout: int, kernel: int | Sequence[int] = 3,
                 stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                 subm: bool = False):
        super().__init__()
        self.kernel, self.stride, self.padding = _triple(kernel), _triple(stride), _triple(padding)
        if subm and self.stride != (1, 1, 1):
            raise ValueError("a submanifold sparse conv has stride 1")
        self.subm = subm
        self.weight = nn.Parameter(torch.empty(*self.kernel, cin, cout))
        nn.init.kaiming_uniform_(self.weight.view(-1, cin, cout).permute(2, 1, 0), a=5 ** 0.5)
        self.register_buffer("offsets", torch.tensor(
            list(itertools.product(*(range(k) for k in self.kernel))), dtype=torch.long),
            persistent=False)

    def output_shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
        if self.subm:
            return tuple(shape)
        return tuple((n + 2 * p - k) // s + 1
                     for n, k, s, p in zip(shape, self.kernel, self.stride, self.padding))

    def output_sites(self, x: SparseTensor) -> torch.Tensor:
        """The active output coordinates (sorted by site), ``M x 4``."""
        if self.subm:
            return x.coords
        shape = self.output_shape(x.shape)
        s = torch.tensor(self.stride, device=x.coords.device)
        lim = torch.tensor(shape, device=x.coords.device)
        pad = torch.tensor(self.padding, device=x.coords.device)
        sites = []
        for off in self.offsets:
            num = x.coords[:, 1:] + pad - off
            ok = ((num >= 0) & (num % s == 0) & (num // s < lim)).all(1)
            sites.append(torch.cat([x.coords[ok, :1], num[ok] // s], 1))
        return _unique_sites(torch.cat(sites), shape)

    def forward(self, x: SparseTensor) -> SparseTensor:
        out_coords = self.output_sites(x)
        shape = self.output_shape(x.shape)
        out = x.feats.new_zeros(len(out_coords), self.weight.shape[-1])
        if not len(out_coords):
            return SparseTensor(out, out_coords, shape, x.batch)
        in_keys = _keys(x.coords, x.shape)
        sorted_keys, order = in_keys.sort()
        dev = x.coords.device
        s = torch.tensor(self.stride, device=dev)
        pad = torch.tensor(self.padding, device=dev)
        lim = torch.tensor(x.shape, device=dev)
        w = self.weight.reshape(len(self.offsets), *self.weight.shape[-2:])
        base = out_coords[:, 1:] * s - pad
        for i, off in enumerate(self.offsets):
            pos = base + off
            inside = ((pos >= 0) & (pos < lim)).all(1)
            q = _keys(torch.cat([out_coords[:, :1], pos], 1), x.shape)
            j = torch.searchsorted(sorted_keys, q).clamp_(max=len(sorted_keys) - 1)
            hit = inside & (sorted_keys[j] == q)
            rows = hit.nonzero()[:, 0]
            if len(rows):
                out.index_add_(0, rows, (x.feats[order[j[rows]]] @ w[i]).to(out.dtype))
        return SparseTensor(out, out_coords, shape, x.batch)


def _unique_sites(sites: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Unique ``(batch, x, y, z)`` rows, sorted by site."""
    x, y, z = shape
    k = torch.unique(_keys(sites, shape))
    return torch.stack([k // (x * y * z), k // (y * z) % x, k // z % y, k % z], 1)


class _SparseBNReLU(nn.Module):
    """The official ``SparseSequential(conv, BN1d, ReLU)``: parameters ``0`` (conv), ``1`` (BN)."""

    def __init__(self, conv: SparseConv3d, cout: int, relu: bool = True):
        super().__init__()
        self.add_module("0", conv)
        self.add_module("1", nn.BatchNorm1d(cout, eps=BN_EPS, momentum=0.01))
        self.relu = relu

    def forward(self, x: SparseTensor) -> SparseTensor:
        y = getattr(self, "0")(x)
        f = getattr(self, "1")(y.feats)
        return y.replace(torch.relu(f) if self.relu else f)


class SparseBasicBlock(nn.Module):
    """Two submanifold 3x3x3 convs (``conv1``, ``conv2``) with BN1d (``bn1``, ``bn2``); ReLU
    between, residual sum, ReLU (mmdet ``BasicBlock`` on sparse features)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = SparseConv3d(channels, channels, 3, padding=1, subm=True)
        self.bn1 = nn.BatchNorm1d(channels, eps=BN_EPS, momentum=0.01)
        self.conv2 = SparseConv3d(channels, channels, 3, padding=1, subm=True)
        self.bn2 = nn.BatchNorm1d(channels, eps=BN_EPS, momentum=0.01)

    def forward(self, x: SparseTensor) -> SparseTensor:
        y = self.conv1(x)
        y = self.conv2(y.replace(torch.relu(self.bn1(y.feats))))
        return y.replace(torch.relu(self.bn2(y.feats) + x.feats))


class SparseEncoder(nn.Module):
    """Voxel features -> ``B x (C Z) x X x Y`` BEV features (module docstring, step 2).

    Args:
        in_channels: point features (5: x, y, z, intensity, time lag).
        sparse_shape: the ``(X, Y, Z)`` grid (official 1024, 1024, 41).
        channels: per stage, its block channels (official (16, 16, 32), (32, 32, 64),
            (64, 64, 128), (128, 128)): all but the last of a stage are basic blocks (the whole
            last stage), the last is the stride-2 conv's output.
        paddings: the stride-2 convs' (x, y, z) paddings, one per stage but the last.
        out_channels: ``conv_out`` channels (official 128).
    """

    def __init__(self, in_channels: int, sparse_shape: Sequence[int],
                 channels: Sequence[Sequence[int]], paddings: Sequence[Sequence[int]],
                 out_channels: int):
        super().__init__()
        self.sparse_shape = tuple(sparse_shape)
        base = channels[0][0]
        self.conv_input = _SparseBNReLU(SparseConv3d(in_channels, base, 3, padding=1,
                                                     subm=True), base)
        self.encoder_layers = nn.Module()
        cin, shape = base, self.sparse_shape
        for i, stage in enumerate(channels):
            last = i == len(channels) - 1
            blocks = []
            for j, c in enumerate(stage):
                if j == len(stage) - 1 and not last:
                    conv = SparseConv3d(cin, c, 3, stride=2, padding=paddings[i])
                    blocks.append(_SparseBNReLU(conv, c))
                    shape = conv.output_shape(shape)
                else:
                    blocks.append(SparseBasicBlock(c))
                cin = c
            self.encoder_layers.add_module(f"encoder_layer{i + 1}", nn.Sequential(*blocks))
        conv_out = SparseConv3d(cin, out_channels, (1, 1, 3), stride=(1, 1, 2))
        self.conv_out = _SparseBNReLU(conv_out, out_channels)
        self.bev_shape = conv_out.output_shape(shape)
        self.out_channels = out_channels * self.bev_shape[2]

    def stages(self, feats: torch.Tensor, coords: torch.Tensor, batch: int
               ) -> list[SparseTensor]:
        """The sparse tensors after ``conv_input``, each stage and ``conv_out``."""
        x = self.conv_input(SparseTensor(feats, coords.long(), self.sparse_shape, batch))
        out = [x]
        for stage in self.encoder_layers.children():
            x = stage(x)
            out.append(x)
        out.append(self.conv_out(x))
        return out

    def forward(self, feats: torch.Tensor, coords: torch.Tensor, batch: int) -> torch.Tensor:
        """``feats`` V x F at ``coords`` V x 4 (batch, x, y, z) -> B x (C Z) x X x Y."""
        dense = self.stages(feats, coords, batch)[-1].dense()  # B C X Y Z
        b, c, x, y, z = dense.shape
        return dense.permute(0, 1, 4, 2, 3).reshape(b, c * z, x, y)


class LidarEncoder(nn.Module):
    """Points -> LiDAR BEV features: :func:`voxelize` then :class:`SparseEncoder` (``backbone``).

    Args:
        in_channels, channels, paddings, out_channels: see :class:`SparseEncoder`.
        point_range: (x0, y0, z0, x1, y1, z1); voxel_size: (x, y, z), metres.
        max_points: points kept per voxel; max_voxels: (training, evaluation) voxel limits.
    """

    def __init__(self, in_channels: int, point_range: Sequence[float],
                 voxel_size: Sequence[float], max_points: int, max_voxels: Sequence[int],
                 channels: Sequence[Sequence[int]], paddings: Sequence[Sequence[int]],
                 out_channels: int):
        super().__init__()
        self.point_range, self.voxel_size = tuple(point_range), tuple(voxel_size)
        self.max_points, self.max_voxels = max_points, tuple(max_voxels)
        grid = voxel_grid(point_range, voxel_size)
        self.backbone = SparseEncoder(in_channels, (grid[0], grid[1], grid[2] + 1), channels,
                                      paddings, out_channels)
        self.out_channels = self.backbone.out_channels
        self.bev_shape = self.backbone.bev_shape[:2]

    def voxels(self, points: torch.Tensor, mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """B x P x F points (``mask`` B x P: the real ones) -> (features V x F, coords V x 4)."""
        limit = self.max_voxels[0 if self.training else 1]
        feats, coords = [], []
        for b in range(points.shape[0]):
            p = points[b] if mask is None else points[b][mask[b]]
            f, c = voxelize(p, self.point_range, self.voxel_size, self.max_points, limit)
            feats.append(f)
            coords.append(torch.cat([torch.full_like(c[:, :1], b), c], 1))
        return torch.cat(feats), torch.cat(coords)

    def forward(self, points: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            feats, coords = self.voxels(points, mask)
        return self.backbone(feats, coords, points.shape[0])


class ConvFuser(nn.Sequential):
    """``concat`` -> 3x3 conv (no bias) -> BN -> ReLU; parameters ``0``, ``1``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return super().forward(torch.cat(list(inputs), 1))


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout, eps=BN_EPS, momentum=0.01), nn.ReLU(inplace=True)]


class SECOND(nn.Module):
    """Stages (``blocks``) of a strided 3x3 conv and ``layers`` 3x3 convs (each -> BN -> ReLU);
    returns every stage's output. Official (fusion): 128, 256 channels, strides 1, 2, 5
    layers."""

    def __init__(self, in_channels: int, channels: Sequence[int], strides: Sequence[int],
                 layers: int):
        super().__init__()
        cins = [in_channels, *channels[:-1]]
        self.blocks = nn.ModuleList(
            nn.Sequential(*_conv_bn_relu(cin, c, s),
                          *itertools.chain.from_iterable(_conv_bn_relu(c, c)
                                                         for _ in range(layers)))
            for cin, c, s in zip(cins, channels, strides))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for block in self.blocks:
            x = block(x)
            out.append(x)
        return out


class SECONDFPN(nn.Module):
    """Each stage back to the decoder's input resolution (``upsample`` = that stage's total
    stride: a 1x1 conv if 1, a transposed conv of kernel and stride ``upsample`` otherwise;
    no bias) -> BN -> ReLU; concatenated (``deblocks``)."""

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int],
                 upsample: Sequence[int]):
        super().__init__()
        self.deblocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cin, c, 1, bias=False) if u == 1
                          else nn.ConvTranspose2d(cin, c, u, stride=u, bias=False),
                          nn.BatchNorm2d(c, eps=BN_EPS, momentum=0.01), nn.ReLU(inplace=True))
            for cin, c, u in zip(in_channels, out_channels, upsample))
        self.out_channels = sum(out_channels)

    def forward(self, stages: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([d(x) for d, x in zip(self.deblocks, stages)], 1)
