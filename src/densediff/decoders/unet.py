"""The DDPM-style UNet denoiser of DDPS (paper App. C; official ``unet_time_embed.py``, itself
after lucidrains' denoising-diffusion-pytorch).

Per level of the down path: two residual blocks (weight-standardised 3x3 conv, GroupNorm, SiLU;
the time embedding scales and shifts the first block), a pre-norm linear attention, and a
downsampling conv (4x4 stride 2; a 3x3 conv on the last level). The middle has full softmax
attention between two residual blocks; the up path mirrors the down path on skip-concatenated
inputs (nearest x2 + 3x3 conv). A last residual block on concat(output, first features) and a
1x1 conv give ``out_channels``.

Sizes (``dim``, ``dim_mults``) of the paper's UNet-T/S/M/L are in ``configs/_base_/ddps.yaml``.
The input sides must be divisible by ``2 ** (len(dim_mults) - 1)``; :meth:`UNet.forward` pads
(zeros, bottom/right) and crops back, so any size works.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SinusoidalTimeEmbedding", "UNet"]


class SinusoidalTimeEmbedding(nn.Module):
    """Fixed sinusoidal embedding of a scalar time per batch item (DDPM / Transformer)."""

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2 or dim < 4:
            raise ValueError(f"dim must be even and >= 4, got {dim}")
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32)
                          * (-math.log(10000.0) / (half - 1)))
        args = t.float()[:, None] * freqs[None]
        return torch.cat([args.sin(), args.cos()], dim=-1)


class WSConv2d(nn.Conv2d):
    """Conv with weight standardisation (per output channel: zero mean, unit variance)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return F.conv2d(x, (w - mean) * (var + eps).rsqrt(), self.bias, self.stride,
                        self.padding, self.dilation, self.groups)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of each pixel (B x C x H x W)."""

    def __init__(self, dim: int):
        super().__init__()
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        var, mean = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
        return (x - mean) * (var + eps).rsqrt() * self.g


class _Block(nn.Module):
    def __init__(self, dim: int, dim_out: int, groups: int):
        super().__init__()
        self.proj = WSConv2d(dim, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, scale_shift=None) -> torch.Tensor:
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return self.act(x)


class ResnetBlock(nn.Module):
    """Two conv blocks; the time embedding gives (scale, shift) for the first one."""

    def __init__(self, dim: int, dim_out: int, time_dim: int, groups: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, dim_out * 2))
        self.block1 = _Block(dim, dim_out, groups)
        self.block2 = _Block(dim_out, dim_out, groups)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        scale_shift = self.mlp(t_emb)[:, :, None, None].chunk(2, dim=1)
        h = self.block2(self.block1(x, scale_shift))
        return h + self.res_conv(x)


class LinearAttention(nn.Module):
    """Linear attention (softmax over features for q, over positions for k), pre-normed,
    with a residual connection."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        hidden = heads * dim_head
        self.norm = ChannelLayerNorm(dim)
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(hidden, dim, 1), ChannelLayerNorm(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        # contiguous: at batch > 1 the chunks are strided views, and einsum's matrix kernels
        # round strided operands differently (an image's result would depend on its batch)
        q, k, v = (t.reshape(b, self.heads, -1, h * w).contiguous()
                   for t in self.to_qkv(self.norm(x)).chunk(3, dim=1))
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q).reshape(b, -1, h, w)
        return self.to_out(out) + x


class Attention(nn.Module):
    """Full softmax self-attention over all positions, pre-normed, with a residual."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32):
        super().__init__()
        self.heads = heads
        hidden = heads * dim_head
        self.norm = ChannelLayerNorm(dim)
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = (t.reshape(b, self.heads, -1, h * w).contiguous().transpose(-1, -2)
                   for t in self.to_qkv(self.norm(x)).chunk(3, dim=1))  # as above
        out = F.scaled_dot_product_attention(q, k, v)  # b heads n d
        return self.to_out(out.transpose(-1, -2).reshape(b, -1, h, w)) + x


class UNet(nn.Module):
    """Time-conditioned UNet: ``(B x in_channels x H x W, time B) -> B x out_channels x H x W``.

    Args:
        in_channels: input channels (DDPS: condition features + embedded noisy mask).
        out_channels: output channels (features for the classifier).
        dim: base width.
        dim_mults: width multiplier per level (its length is the number of levels).
        groups: GroupNorm groups.
        heads, dim_head: attention heads and their width.
    """

    def __init__(self, in_channels: int, out_channels: int, dim: int = 256,
                 dim_mults: Sequence[int] = (1, 1, 1), groups: int = 8, heads: int = 4,
                 dim_head: int = 32):
        super().__init__()
        self.init_conv = nn.Conv2d(in_channels, dim, 7, padding=3)
        time_dim = dim * 4
        self.time_mlp = nn.Sequential(SinusoidalTimeEmbedding(dim), nn.Linear(dim, time_dim),
                                      nn.GELU(), nn.Linear(time_dim, time_dim))
        dims = [dim] + [dim * m for m in dim_mults]
        pairs = list(zip(dims[:-1], dims[1:]))
        self.factor = 2 ** (len(pairs) - 1)

        def res(a: int, b: int) -> ResnetBlock:
            return ResnetBlock(a, b, time_dim, groups)

        self.downs = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(pairs):
            last = i == len(pairs) - 1
            self.downs.append(nn.ModuleList([
                res(d_in, d_in), res(d_in, d_in), LinearAttention(d_in, heads, dim_head),
                nn.Conv2d(d_in, d_out, 3, padding=1) if last
                else nn.Conv2d(d_in, d_out, 4, stride=2, padding=1)]))
        mid = dims[-1]
        self.mid_block1 = res(mid, mid)
        self.mid_attn = Attention(mid, heads, dim_head)
        self.mid_block2 = res(mid, mid)
        self.ups = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(reversed(pairs)):
            last = i == len(pairs) - 1
            self.ups.append(nn.ModuleList([
                res(d_out + d_in, d_out), res(d_out + d_in, d_out),
                LinearAttention(d_out, heads, dim_head),
                nn.Conv2d(d_out, d_in, 3, padding=1) if last
                else nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                   nn.Conv2d(d_out, d_in, 3, padding=1))]))
        self.final_res = res(dim * 2, dim)
        self.final_conv = nn.Conv2d(dim, out_channels, 1)

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        h0, w0 = x.shape[-2:]
        f = self.factor
        ph, pw = (-h0) % f, (-w0) % f
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        x = self.init_conv(x)
        first = x
        t = self.time_mlp(time)
        skips = []
        for block1, block2, attn, down in self.downs:
            x = block1(x, t)
            skips.append(x)
            x = attn(block2(x, t))
            skips.append(x)
            x = down(x)
        x = self.mid_block2(self.mid_attn(self.mid_block1(x, t)), t)
        for block1, block2, attn, up in self.ups:
            x = block1(torch.cat([x, skips.pop()], 1), t)
            x = attn(block2(torch.cat([x, skips.pop()], 1), t))
            x = up(x)
        x = self.final_res(torch.cat([x, first], 1), t)
        return self.final_conv(x)[..., :h0, :w0]
