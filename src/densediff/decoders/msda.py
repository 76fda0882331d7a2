"""Multi-scale deformable attention (MSDA) in pure PyTorch.

This is the attention of Deformable DETR (Zhu et al., ICLR 2021) as packaged by mmcv's
``MultiScaleDeformableAttention``, which the DDP map decoder uses (Ji et al., "DDP: Diffusion
Model for Dense Visual Prediction", §3.2; official code https://github.com/JiYuanFeng/DDP,
whose decode heads call ``mmcv.ops.MultiScaleDeformableAttention``). Each query predicts, per
head, level and point, a 2-D offset from its reference point and an attention weight; the
output is the weighted sum of the values bilinearly sampled at the resulting locations.

All sampling goes through :func:`ms_deform_attn`, a ``grid_sample`` implementation that needs
no compiled extension. It is the single place to swap in a faster kernel (e.g. mmcv's CUDA op).

Shape letters used throughout:

- ``B`` batch, ``Q`` queries, ``S`` value tokens (``S = sum_l H_l * W_l``);
- ``M`` heads, ``D`` channels per head, ``C = M * D`` channels;
- ``L`` levels, ``P`` sampling points per head and level.

Locations are normalised ``(x, y)``: 0 and 1 are the outer edges of the map, so the centre of
pixel ``(i, j)`` of an ``H x W`` level lies at ``((j + 0.5) / W, (i + 0.5) / H)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention core: sample, weight, sum.

    Every deformable attention in densediff goes through this one function, so that a faster
    kernel (mmcv's or Deformable DETR's CUDA op, with the same signature and semantics) can be
    dropped in here later without touching the modules. This version is plain PyTorch, runs on
    any device and dtype, and is differentiable in all three float inputs. It computes what
    mmcv's ``multi_scale_deform_attn_pytorch`` computes (the same sampling convention as the
    CUDA kernel), without copying its code.

    Sampling is bilinear with zero padding (``grid_sample`` with ``align_corners=False``): a
    neighbour pixel outside the map contributes zero, so a location more than one pixel outside
    the map samples zero.

    Args:
        value: ``(B, S, M, D)``, the value tokens of all levels, level after level, each level
            flattened row-major (``H_l x W_l``).
        spatial_shapes: ``(L, 2)`` integer tensor of the levels' ``(H_l, W_l)``.
        sampling_locations: ``(B, Q, M, L, P, 2)`` normalised ``(x, y)`` locations (0 and 1 are
            the outer pixel edges; values outside ``[0, 1]`` are allowed).
        attention_weights: ``(B, Q, M, L, P)``; already normalised (softmax over ``L * P``).

    Returns:
        ``(B, Q, M * D)``, heads concatenated head-major (channel ``m * D + d``).
    """
    b, s, m, d = value.shape
    _, q, _, num_levels, p, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    if len(shapes) != num_levels or sum(h * w for h, w in shapes) != s:
        raise ValueError(f"spatial_shapes {shapes} do not fit value with {s} tokens and "
                         f"sampling_locations with {num_levels} levels")

    # grid_sample works on (N, C, H, W) maps with an (N, Q, P, 2) grid in [-1, 1]; fold the
    # heads into N so that one call per level samples all heads at once.
    grids = (2 * sampling_locations - 1).permute(0, 2, 3, 1, 4, 5)  # B, M, L, Q, P, 2
    weights = attention_weights.permute(0, 2, 3, 1, 4)  # B, M, L, Q, P
    out = value.new_zeros(b * m, d, q)
    for level, (v, (h, w)) in enumerate(zip(value.split([h * w for h, w in shapes], dim=1), shapes)):
        v = v.permute(0, 2, 3, 1).reshape(b * m, d, h, w)
        grid = grids[:, :, level].reshape(b * m, q, p, 2)
        sampled = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # sampled: (B*M, D, Q, P); weight the P points of this level and sum them
        out = out + (sampled * weights[:, :, level].reshape(b * m, 1, q, p)).sum(-1)
    return out.view(b, m * d, q).transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """mmcv ``MultiScaleDeformableAttention`` (batch-first, no key padding mask).

    The offsets and attention weights are linear functions of ``query + query_pos``; the values
    are ``value_proj(value)`` split into ``num_heads`` heads. Offsets are in pixels of each
    level: they are divided by ``(W_l, H_l)`` before being added to the normalised reference
    points. The attention weights are softmaxed jointly over the ``L * P`` samples of a head.

    Like mmcv, the module adds its own residual: it returns ``query + dropout(output_proj(...))``
    where ``query`` is the input *without* ``query_pos``. A transformer layer using it must
    therefore not add the identity again.

    Args:
        embed_dims: channels ``C`` of query, value and output.
        num_heads: ``M``; must divide ``embed_dims``.
        num_levels: ``L``, the number of value levels.
        num_points: ``P``, sampling points per head and level.
        dropout: dropout on the projected output, before the residual.
    """

    def __init__(self, embed_dims: int = 256, num_heads: int = 8, num_levels: int = 1,
                 num_points: int = 4, dropout: float = 0.0):
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError(f"embed_dims ({embed_dims}) must be divisible by num_heads ({num_heads})")
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        samples = num_heads * num_levels * num_points
        self.sampling_offsets = nn.Linear(embed_dims, samples * 2)
        self.attention_weights = nn.Linear(embed_dims, samples)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.dropout = nn.Dropout(dropout)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """mmcv's init.

        - ``sampling_offsets``: weight 0; the bias points head ``m`` in direction
          ``theta_m = 2*pi*m / M``, scaled so that the larger of ``|x|, |y|`` is 1 (for M = 8:
          the 8 neighbours of a pixel), and multiplied by ``i + 1`` for point ``i``. All levels
          share the pattern. So initially the points form rings of radius 1..P pixels.
        - ``attention_weights``: weight and bias 0 (uniform attention).
        - ``value_proj``, ``output_proj``: xavier-uniform weight, bias 0.
        """
        m, lv, p = self.num_heads, self.num_levels, self.num_points
        thetas = torch.arange(m, dtype=torch.float64) * (2 * math.pi / m)
        directions = torch.stack([thetas.cos(), thetas.sin()], -1)
        directions = directions / directions.abs().amax(-1, keepdim=True)
        scale = torch.arange(1, p + 1, dtype=torch.float64).view(1, 1, p, 1)
        grid = directions.view(m, 1, 1, 2).expand(m, lv, p, 2) * scale
        nn.init.zeros_(self.sampling_offsets.weight)
        self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: torch.Tensor, value: torch.Tensor, reference_points: torch.Tensor,
                spatial_shapes: torch.Tensor, query_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Deformable attention from ``query`` to ``value``, plus the residual ``query``.

        Args:
            query: ``(B, Q, C)``.
            value: ``(B, S, C)``, levels flattened and concatenated as in :func:`ms_deform_attn`.
            reference_points: ``(B, Q, L, 2)`` normalised ``(x, y)`` per query and level.
            spatial_shapes: ``(L, 2)`` integer tensor of ``(H_l, W_l)``.
            query_pos: ``(B, Q, C)`` positional embedding added to the query for predicting
                offsets and weights (not to the residual), or None.

        Returns:
            ``(B, Q, C)``.
        """
        identity = query
        if query_pos is not None:
            query = query + query_pos
        b, q, _ = query.shape
        m, lv, p = self.num_heads, self.num_levels, self.num_points

        value = self.value_proj(value).view(b, value.shape[1], m, -1)
        offsets = self.sampling_offsets(query).view(b, q, m, lv, p, 2)
        weights = self.attention_weights(query).view(b, q, m, lv * p).softmax(-1).view(b, q, m, lv, p)
        # offsets are in pixels of each level: normalise by (W_l, H_l)
        normaliser = spatial_shapes.flip(-1).to(offsets.dtype)  # (L, 2) as (W, H)
        locations = reference_points[:, :, None, :, None, :] + offsets / normaliser[:, None, :]

        out = ms_deform_attn(value, spatial_shapes, locations, weights)
        return self.dropout(self.output_proj(out)) + identity
