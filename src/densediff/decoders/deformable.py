"""DDP's deformable-attention map decoder, with optional time FiLM.

The map decoder of DDP (Ji et al., "DDP: Diffusion Model for Dense Visual Prediction", §3.2)
refines the fused map (image features + noisy label map) with a stack of deformable-attention
transformer layers and classifies every pixel with a 1x1 conv. This module reproduces the
official ``DeformableHeadWithTime`` (``segmentation/mmseg/models/decode_heads/
deformable_head_with_time.py`` in https://github.com/JiYuanFeng/DDP), which is built from
mmcv's ``DetrTransformerEncoder``, ``BaseTransformerLayer`` and ``MultiScaleDeformableAttention``:

- tokens are the ``h * w`` pixels of the map; query and value are both the map, so each layer
  is deformable *self*-attention over the map;
- the query positional embedding is mmdet's normalised :class:`SinePositionalEncoding`, the
  reference points are the pixel centres normalised to ``(0, 1)``;
- each layer is post-norm: ``self_attn -> LayerNorm -> FFN -> LayerNorm`` (FFN with GELU);
- time enters only as a FiLM applied *after* each whole layer:
  ``x <- x * (1 + scale) + shift`` with ``(scale, shift) = Linear(SiLU(time_emb))``;
- the result is reshaped to ``B x C x h x w`` and classified by ``conv_seg`` (1x1 conv).

The official config is ``DeformableDecoder(256, K, channels=256, num_layers=6, num_heads=8,
num_points=4, num_levels=1, ffn_channels=1024, time_channels=1024)``. With
``time_channels=None`` the same class is the non-diffusion twin (the official, unused
``DeformableHead``): the same decoder without FiLM.

``num_levels > 1`` is an extension, not in the official: see :class:`DeformableDecoder`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from densediff.decoders.msda import MSDeformAttn


class SinePositionalEncoding(nn.Module):
    """mmdet's ``SinePositionalEncoding`` (DETR's 2-D sine embedding) for an all-valid mask.

    With ``normalize=True`` the row and column coordinates of pixel ``(i, j)`` are
    ``y = (i + 1 + offset) / (h + eps) * scale`` and ``x = (j + 1 + offset) / (w + eps) * scale``
    (with the default ``offset=-0.5`` that is the pixel centre, scaled to ``(0, 2*pi)``).
    With ``dim_t[k] = temperature ** (2 * (k // 2) / num_feats)`` the embedding has
    ``2 * num_feats`` channels: first the ``num_feats`` channels of ``y``, then those of ``x``,
    each interleaving ``sin(coord / dim_t[2k])`` (channel ``2k``) and
    ``cos(coord / dim_t[2k + 1])`` (channel ``2k + 1``).

    Args:
        num_feats: channels per axis (even); the output has ``2 * num_feats`` channels.
        temperature: base of the frequency ladder.
        normalize: whether to normalise the coordinates to ``(0, scale)``.
        scale: the normalised range (2*pi).
        offset: added to the 1-based coordinate before normalising.
        eps: added to the normaliser.
    """

    def __init__(self, num_feats: int = 128, temperature: float = 10000, normalize: bool = True,
                 scale: float = 2 * math.pi, offset: float = -0.5, eps: float = 1e-6):
        super().__init__()
        if num_feats % 2:
            raise ValueError(f"num_feats must be even, got {num_feats}")
        self.num_feats = num_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.offset = offset
        self.eps = eps

    def forward(self, x: torch.Tensor | int, h: int | None = None, w: int | None = None,
                device: torch.device | str | None = None,
                dtype: torch.dtype | None = None) -> torch.Tensor:
        """The embedding of an ``h x w`` map, ``B x (2 * num_feats) x h x w``.

        Call it as ``forward(x)`` with a ``B x C x h x w`` tensor (its batch size, size, device
        and dtype are used) or as ``forward(b, h, w, device, dtype)``. The result is
        the same for every batch element (an expanded view over ``B``). It is computed in at
        least float32 (as mmdet does) and then cast to ``dtype``.
        """
        if isinstance(x, torch.Tensor):
            b, _, h, w = x.shape
            device, dtype = x.device, x.dtype
        else:
            b = x
            if h is None or w is None:
                raise TypeError("forward(b, h, w) needs h and w")
        dtype = dtype or torch.get_default_dtype()
        work = torch.promote_types(dtype, torch.float32)

        y = torch.arange(1, h + 1, dtype=work, device=device)
        xs = torch.arange(1, w + 1, dtype=work, device=device)
        if self.normalize:
            y = (y + self.offset) / (h + self.eps) * self.scale
            xs = (xs + self.offset) / (w + self.eps) * self.scale
        k = torch.arange(self.num_feats, dtype=work, device=device)
        dim_t = self.temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / self.num_feats)

        def embed(coord: torch.Tensor) -> torch.Tensor:  # (n,) -> (n, num_feats), sin/cos interleaved
            t = coord[:, None] / dim_t
            return torch.stack([t[:, 0::2].sin(), t[:, 1::2].cos()], dim=-1).flatten(1)

        pos_y = embed(y)[:, None, :].expand(h, w, self.num_feats)
        pos_x = embed(xs)[None, :, :].expand(h, w, self.num_feats)
        pos = torch.cat([pos_y, pos_x], dim=-1).permute(2, 0, 1).to(dtype)
        return pos[None].expand(b, -1, -1, -1)


class DeformableLayer(nn.Module):
    """One post-norm deformable transformer layer with optional time FiLM.

    mmcv ``BaseTransformerLayer`` with ``operation_order=('self_attn', 'norm', 'ffn', 'norm')``
    as overridden by DDP (``use_time_mlp=True``)::

        x = LN(attn(x))              # MSDeformAttn adds the residual itself
        x = LN(x + FFN(x))           # FFN: Linear(dims, ffn) -> GELU -> Linear(ffn, dims)
        x = x * (1 + scale) + shift  # only with time_channels; scale, shift = Linear(SiLU(t))

    Args:
        dims: token channels.
        num_heads, num_points, num_levels: of the :class:`MSDeformAttn`.
        ffn_channels: hidden channels of the FFN.
        time_channels: channels of the time embedding; None disables the FiLM.
    """

    def __init__(self, dims: int, num_heads: int, num_points: int, num_levels: int,
                 ffn_channels: int, time_channels: int | None):
        super().__init__()
        self.attn = MSDeformAttn(dims, num_heads, num_levels, num_points)
        self.norm1 = nn.LayerNorm(dims)
        self.ffn = nn.Sequential(nn.Linear(dims, ffn_channels), nn.GELU(), nn.Linear(ffn_channels, dims))
        self.norm2 = nn.LayerNorm(dims)
        self.time_mlp = (nn.Sequential(nn.SiLU(), nn.Linear(time_channels, 2 * dims))
                         if time_channels is not None else None)

    def forward(self, query: torch.Tensor, value: torch.Tensor | None, reference_points: torch.Tensor,
                spatial_shapes: torch.Tensor, query_pos: torch.Tensor | None = None,
                time_emb: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, Q, C)`` -> ``(B, Q, C)``.

        Args:
            query: ``(B, Q, C)`` tokens.
            value: ``(B, S, C)`` value tokens, or None for self-attention (value = query).
            reference_points: ``(B, Q, L, 2)``; spatial_shapes: ``(L, 2)`` (see
                :class:`MSDeformAttn`).
            query_pos: ``(B, Q, C)`` or None.
            time_emb: ``(B, time_channels)``; required iff the layer has a time MLP.
        """
        if (time_emb is None) != (self.time_mlp is None):
            raise ValueError("time_emb must be given exactly when the layer has time_channels")
        x = self.attn(query, query if value is None else value, reference_points, spatial_shapes, query_pos)
        x = self.norm1(x)
        x = self.norm2(x + self.ffn(x))
        if self.time_mlp is not None:
            scale, shift = self.time_mlp(time_emb)[:, None, :].chunk(2, dim=-1)
            x = x * (1 + scale) + shift
        return x


class DeformableDecoder(nn.Module):
    """DDP's map decoder (``DeformableHeadWithTime``; §3.2 of the paper, §1.3 of the notes).

    ``B x in_channels x h x w`` (and a ``B x time_channels`` time embedding) ->
    ``B x out_channels x h x w`` logits at the same resolution.

    Steps:

    1. if ``in_channels != channels``, a 1x1 conv projects the map (the official has
       ``in_channels == channels == 256`` and no projection);
    2. the ``h * w`` pixels become the tokens; the query positional embedding is a
       :class:`SinePositionalEncoding` with ``channels // 2`` features per axis; the reference
       points are the pixel centres ``((j + 0.5) / w, (i + 0.5) / h)``, in float32 (float64 for
       a float64 model) also when the map is bf16 under autocast;
    3. ``num_layers`` :class:`DeformableLayer` s of deformable self-attention, each receiving
       ``time_emb`` (FiLM after each layer);
    4. tokens back to ``B x channels x h x w``, optional ``Dropout2d(dropout)`` (the official
       applies none), then ``conv_seg``, a 1x1 conv to ``out_channels``.

    Multi-level values (``num_levels > 1``, an extension): before every layer the value pyramid
    is the current token map plus ``num_levels - 1`` average-pooled copies of it (non-overlapping
    ``2**l x 2**l`` windows, ``ceil_mode=True``, so level ``l`` is ``ceil(h / 2**l) x
    ceil(w / 2**l)``), and a learned level embedding ``level_embed[l]`` is added to the tokens of
    level ``l``. Queries stay the level-0 tokens and each query uses its pixel centre as the
    reference point on every level. With ``num_levels=1`` there is no pooling and no level
    embedding: exactly the official decoder.

    Init (as the official): xavier-uniform on every parameter with more than one dimension
    (attention projections, FFN, time MLPs, ``conv_seg``, the input projection), then each
    :class:`MSDeformAttn`'s own :meth:`~MSDeformAttn.init_weights`; biases and LayerNorms keep
    PyTorch's defaults. The level embedding, when present, is then drawn from N(0, 1) as in
    Deformable DETR.

    Args:
        in_channels: channels of the input map.
        out_channels: number of output channels (classes).
        channels: token channels (``embed_dims``); must be even.
        num_layers: number of transformer layers.
        num_heads, num_points, num_levels: of every :class:`MSDeformAttn`.
        ffn_channels: hidden channels of the FFNs.
        time_channels: channels of the time embedding; None gives the non-diffusion twin.
        dropout: ``Dropout2d`` probability before ``conv_seg`` (0 disables it).
        out_kernel: kernel of ``conv_seg`` (1; the official depth head uses 3).
    """

    def __init__(self, in_channels: int, out_channels: int, channels: int = 256, num_layers: int = 6,
                 num_heads: int = 8, num_points: int = 4, num_levels: int = 1, ffn_channels: int = 1024,
                 time_channels: int | None = None, dropout: float = 0.0, out_kernel: int = 1):
        super().__init__()
        if channels % 2:
            raise ValueError(f"channels must be even (sine positional encoding), got {channels}")
        self.channels = channels
        self.num_levels = num_levels
        self.time_channels = time_channels
        self.input_proj = nn.Conv2d(in_channels, channels, 1) if in_channels != channels else nn.Identity()
        self.positional_encoding = SinePositionalEncoding(channels // 2)
        self.level_embed = nn.Parameter(torch.empty(num_levels, channels)) if num_levels > 1 else None
        self.layers = nn.ModuleList(
            DeformableLayer(channels, num_heads, num_points, num_levels, ffn_channels, time_channels)
            for _ in range(num_layers))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, out_channels, out_kernel, padding=out_kernel // 2)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Xavier-uniform on all >1-d parameters, then MSDA init (see the class docstring)."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.init_weights()
        if self.level_embed is not None:
            nn.init.normal_(self.level_embed)

    def level_shapes(self, h: int, w: int) -> list[tuple[int, int]]:
        """``(H_l, W_l)`` of the value levels for an ``h x w`` map."""
        return [(math.ceil(h / 2**lvl), math.ceil(w / 2**lvl)) for lvl in range(self.num_levels)]

    def _values(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor | None:
        """The value tokens for one layer: None (self-attention) for one level, else the pyramid."""
        if self.level_embed is None:
            return None
        b, _, c = tokens.shape
        fmap = tokens.transpose(1, 2).reshape(b, c, h, w)
        levels = [tokens]
        for lvl in range(1, self.num_levels):
            pooled = F.avg_pool2d(fmap, 2**lvl, 2**lvl, ceil_mode=True)
            levels.append(pooled.flatten(2).transpose(1, 2))
        return torch.cat([t + e for t, e in zip(levels, self.level_embed)], dim=1)

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor | None = None) -> torch.Tensor:
        """``B x in_channels x h x w`` (+ ``B x time_channels``) -> ``B x out_channels x h x w``."""
        if (time_emb is None) != (self.time_channels is None):
            raise ValueError("time_emb must be given exactly when the decoder has time_channels "
                             f"(time_channels={self.time_channels})")
        x = self.input_proj(x)
        b, c, h, w = x.shape
        query_pos = self.positional_encoding(x).flatten(2).transpose(1, 2)
        spatial_shapes = torch.tensor(self.level_shapes(h, w), dtype=torch.long, device=x.device)
        # float32 (float64 for a float64 model) even when x is bf16/fp16 (autocast): the
        # sampling locations are built from these and must resolve fractions of a pixel
        reference_points = pixel_centres(h, w, device=x.device,
                                         dtype=torch.promote_types(x.dtype, torch.float32))
        reference_points = reference_points[None, :, None, :].expand(b, -1, self.num_levels, -1)

        tokens = x.flatten(2).transpose(1, 2)
        for layer in self.layers:
            values = self._values(tokens, h, w)
            tokens = layer(tokens, values, reference_points, spatial_shapes, query_pos, time_emb)
        # channels-last at every batch size, batch 1 included: ``transpose(1, 2).reshape``
        # gives a batch of one a batch stride that PyTorch's memory-format heuristic reads as
        # NCHW, and the two convolution kernels round differently
        out = tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)
        return self.conv_seg(self.dropout(out))


def pixel_centres(h: int, w: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(h * w, 2)`` normalised ``(x, y)`` pixel centres ``((j + 0.5) / w, (i + 0.5) / h)``,
    row-major (the reference points of Deformable DETR's encoder with all-valid masks)."""
    ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=-1)
