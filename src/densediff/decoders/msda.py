"""Multi-scale deformable attention (MSDA) in pure PyTorch.

This is the attention of Deformable DETR (Zhu et al., ICLR 2021) as packaged by mmcv's
``MultiScaleDeformableAttention``, which the DDP map decoder uses (Ji et al., "DDP: Diffusion
Model for Dense Visual Prediction", §3.2; official code https://github.com/JiYuanFeng/DDP,
whose decode heads call ``mmcv.ops.MultiScaleDeformableAttention``). Each query predicts, per
head, level and point, a 2-D offset from its reference point and an attention weight; the
output is the weighted sum of the values bilinearly sampled at the resulting locations.

All sampling goes through :func:`ms_deform_attn`, the one entry point, which dispatches to one
of two plain-PyTorch cores computing the same thing (neither needs a compiled extension):

- :func:`ms_deform_attn_grid_sample`: one ``F.grid_sample`` call per level;
- :func:`ms_deform_attn_gather`: one ``F.embedding_bag`` over the (zero-bordered) value rows,
  with the four bilinear corners of every sampling point as weighted rows. On CPU at 16,384
  queries (8 heads x 4 points, 256 channels, one thread) its forward is about 4x faster and
  forward + backward about 1.3-1.8x faster than ``grid_sample``'s.

Which core runs is chosen per call (``impl=``) or per context with :func:`msda_impl`
(``"auto"``, the default, ``"grid_sample"`` or ``"gather"``); see :func:`ms_deform_attn` for
what ``"auto"`` picks. ``ms_deform_attn`` stays the single place to swap in a faster kernel
(e.g. mmcv's CUDA op).

Shape letters used throughout:

- ``B`` batch, ``Q`` queries, ``S`` value tokens (``S = sum_l H_l * W_l``);
- ``M`` heads, ``D`` channels per head, ``C = M * D`` channels;
- ``L`` levels, ``P`` sampling points per head and level.

Locations are normalised ``(x, y)``: 0 and 1 are the outer edges of the map, so the centre of
pixel ``(i, j)`` of an ``H x W`` level lies at ``((j + 0.5) / W, (i + 0.5) / H)``.

Precision: sampling locations and attention weights should be float32 (or float64) even when
the values are bfloat16/float16 (under autocast, say): a bf16 location on a 128-wide map is
quantised to about a quarter of a pixel. :class:`MSDeformAttn` computes them in float32; both
cores accept low-precision values with float32 locations and return the values' dtype.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "IMPLS",
    "MSDeformAttn",
    "current_msda_impl",
    "ms_deform_attn",
    "ms_deform_attn_gather",
    "ms_deform_attn_grid_sample",
    "msda_impl",
]


IMPLS = ("auto", "grid_sample", "gather")
"""The names :func:`msda_impl` and ``ms_deform_attn(impl=...)`` accept."""

# "auto" with gradients needed, per device type: the core that is faster for forward + backward.
# CPU, measured (16,384 queries, 8 heads x 4 points, 1 level, 256 channels, one thread, median
# of 5 interleaved): one MSDeformAttn layer fwd+bwd 0.69 s gather vs 1.29 s grid_sample in fp32,
# 0.73 s vs 1.04 s under bf16 autocast. Other devices (CUDA) were not measured: grid_sample,
# the path used before the gather existed.
_AUTO_TRAIN_IMPL = {"cpu": "gather"}
_AUTO_TRAIN_DEFAULT = "grid_sample"

_IMPL: contextvars.ContextVar[str] = contextvars.ContextVar("densediff_msda_impl", default="auto")


def _check_impl(name: str) -> str:
    if name not in IMPLS:
        raise ValueError(f"unknown MSDA implementation {name!r}; expected one of {IMPLS}")
    return name


def msda_impl(name: str) -> contextlib.AbstractContextManager[None]:
    """Context manager choosing the core behind :func:`ms_deform_attn` (``impl=None`` calls).

    ``name`` is ``"auto"`` (the default outside any ``msda_impl`` block), ``"grid_sample"`` or
    ``"gather"``. The choice lives in a :class:`contextvars.ContextVar`: it is local to the
    thread (and asyncio task), nests, and the previous choice comes back on exit. An unknown
    name raises ``ValueError`` at once. Example::

        with msda_impl("gather"):
            logits = decoder(x)
    """
    _check_impl(name)
    return _msda_impl_context(name)


@contextlib.contextmanager
def _msda_impl_context(name: str) -> Iterator[None]:
    token = _IMPL.set(name)
    try:
        yield
    finally:
        _IMPL.reset(token)


def current_msda_impl() -> str:
    """The name chosen by the innermost :func:`msda_impl` block (``"auto"`` outside any)."""
    return _IMPL.get()


def _is_exporting() -> bool:
    """True while exporting to ONNX or tracing (TorchScript trace, ``torch.export``)."""
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        return True
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting is not None and is_exporting())


def _resolve_impl(impl: str | None, *tensors: torch.Tensor) -> str:
    name = _check_impl(_IMPL.get() if impl is None else impl)
    if name != "auto":
        return name
    if _is_exporting():
        # both cores export (the gather as ONNX Gather + MatMul); onnxruntime runs GridSample
        # faster: 228 vs 531 ms per call at 16,384 queries, 8 heads x 4 points, 2 threads
        # (benchmarks/RESULTS.md section 14h)
        return "grid_sample"
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return _auto_train_impl(tensors[0].device) if needs_grad else "gather"


def _auto_train_impl(device: torch.device) -> str:
    """The core ``"auto"`` picks when gradients are needed, for tensors on ``device``."""
    return _AUTO_TRAIN_IMPL.get(device.type, _AUTO_TRAIN_DEFAULT)


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    impl: str | None = None,
) -> torch.Tensor:
    """Multi-scale deformable attention core: sample, weight, sum.

    Every deformable attention in densediff goes through this one function, so that a faster
    kernel (mmcv's or Deformable DETR's CUDA op, with the same signature and semantics) can be
    dropped in here later without touching the modules. It dispatches to one of two plain
    PyTorch cores that compute the same result (up to float rounding), run on any device and
    are differentiable in all three float inputs; they compute what mmcv's
    ``multi_scale_deform_attn_pytorch`` computes (the same sampling convention as the CUDA
    kernel), without copying its code.

    Sampling is bilinear with zero padding (``grid_sample`` with ``align_corners=False``): a
    neighbour pixel outside the map contributes zero, so a location more than one pixel outside
    the map samples zero.

    Args:
        value: ``(B, S, M, D)``, the value tokens of all levels, level after level, each level
            flattened row-major (``H_l x W_l``).
        spatial_shapes: ``(L, 2)`` integer tensor of the levels' ``(H_l, W_l)``.
        sampling_locations: ``(B, Q, M, L, P, 2)`` normalised ``(x, y)`` locations (0 and 1 are
            the outer pixel edges; values outside ``[0, 1]`` are allowed). Best float32 even for
            low-precision values.
        attention_weights: ``(B, Q, M, L, P)``; already normalised (softmax over ``L * P``).
        impl: ``"grid_sample"``, ``"gather"``, ``"auto"``, or None for the choice of the
            enclosing :func:`msda_impl` block (``"auto"`` outside any). ``"auto"`` picks
            ``"grid_sample"`` while exporting to ONNX or tracing (onnxruntime runs ONNX
            GridSample faster than the gather, which exports as Gather + MatMul); otherwise
            ``"gather"`` when no gradient is needed (grad mode off, or no input requires
            grad). When one is: ``"gather"`` on CPU (measured faster for forward + backward
            too), ``"grid_sample"`` on other devices (not measured there; the older path).

    Returns:
        ``(B, Q, M * D)`` in ``value.dtype``, heads concatenated head-major (channel
        ``m * D + d``).
    """
    name = _resolve_impl(impl, value, sampling_locations, attention_weights)
    if name == "gather":
        return ms_deform_attn_gather(value, spatial_shapes, sampling_locations, attention_weights)
    return ms_deform_attn_grid_sample(value, spatial_shapes, sampling_locations, attention_weights)


def _level_shapes(value: torch.Tensor, spatial_shapes: torch.Tensor,
                  sampling_locations: torch.Tensor) -> list[tuple[int, int]]:
    s = value.shape[1]
    num_levels = sampling_locations.shape[3]
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    if len(shapes) != num_levels or sum(h * w for h, w in shapes) != s:
        raise ValueError(f"spatial_shapes {shapes} do not fit value with {s} tokens and "
                         f"sampling_locations with {num_levels} levels")
    return shapes


def ms_deform_attn_grid_sample(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """:func:`ms_deform_attn` with one ``F.grid_sample`` call per level.

    ``grid_sample`` needs map and grid in one dtype: the sampling and the weighted sum run in
    the promoted dtype of the three inputs (float32 for a bf16 value with float32 locations, so
    the locations keep their precision; the value is upcast, which costs one float32 copy of
    it) and the result is cast back to ``value.dtype``. With all inputs of one dtype nothing is
    cast. Same arguments and result as :func:`ms_deform_attn`.
    """
    b, s, m, d = value.shape
    _, q, _, num_levels, p, _ = sampling_locations.shape
    shapes = _level_shapes(value, spatial_shapes, sampling_locations)
    work = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype),
                               attention_weights.dtype)
    out_dtype = value.dtype
    value, sampling_locations, attention_weights = (
        t.to(work) for t in (value, sampling_locations, attention_weights))

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
    return out.view(b, m * d, q).transpose(1, 2).contiguous().to(out_dtype)


def _padded_levels(value: torch.Tensor, shapes, starts: list[int], s_pad: int,
                   exporting: bool) -> torch.Tensor:
    """``value`` (B, S, M, D) with a one-pixel border of zeros around every level:
    (B, S', M, D); level l starts at row ``starts[l]``. Exporting: a traceable Pad + Concat of
    the same rows."""
    b, _, m, d = value.shape
    levels = zip(value.split([h * w for h, w in shapes], dim=1), shapes)
    if exporting:
        return torch.cat([F.pad(v.unflatten(1, (h, w)), (0, 0, 0, 0, 1, 1, 1, 1)).flatten(1, 2)
                          for v, (h, w) in levels], dim=1)
    padded = value.new_zeros(b, s_pad, m, d)
    for (v, (h, w)), start in zip(levels, starts):
        interior = padded[:, start:start + (h + 2) * (w + 2)].view(b, h + 2, w + 2, m, d)
        interior[:, 1:-1, 1:-1].copy_(v.unflatten(1, (h, w)))
    return padded


def ms_deform_attn_gather(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """:func:`ms_deform_attn` as one weighted ``F.embedding_bag`` gather over the value rows.

    Each level of the value gets a one-pixel border of zeros (so that every corner that
    matters has a row and a corner outside the map reads zero, with no masking), and the
    padded value becomes ``B * S' * M`` rows of ``D`` channels (``S' = sum (H_l + 2)(W_l + 2)``;
    row ``(b * S' + s') * M + m``). Each (batch, query, head) is one bag of ``L * P * 4`` rows:
    the four bilinear corners of each of its sampling points, weighted by ``attention weight *
    bilinear weight``. ``mode="sum"`` then gives the ``(B * Q * M, D)`` output, viewed as
    ``(B, Q, M * D)``: the head-major layout for free.

    Indices and bilinear weights are computed in float32 (float64 when the locations or the
    attention weights are float64), multiplied by the attention weights in that precision, and
    cast to ``value.dtype`` only for the ``embedding_bag`` call (float32, float64, bfloat16 and
    float16 values work). Differentiable in all three inputs: the location gradient flows
    through the bilinear weights (the integer corners are piecewise constant). Same arguments
    and result as :func:`ms_deform_attn` (to float rounding: ~1e-6 relative in float32).
    """
    b, s, m, d = value.shape
    _, q, _, num_levels, p, _ = sampling_locations.shape
    shapes = _level_shapes(value, spatial_shapes, sampling_locations)
    work = torch.promote_types(torch.promote_types(sampling_locations.dtype, attention_weights.dtype),
                               torch.float32)
    device = value.device

    # zero border around every level: B, S', M, D
    starts = [0]  # first padded token of each level
    for h, w in shapes:
        starts.append(starts[-1] + (h + 2) * (w + 2))
    s_pad = starts.pop()
    exporting = _is_exporting()
    padded = _padded_levels(value, shapes, starts, s_pad, exporting)
    # int32 rows (half the memory traffic of int64) when the rows and embedding_bag's int32
    # offsets (up to the number of entries) fit
    fits_int32 = max(b * s_pad * m, b * q * m * num_levels * p * 4) < 2**31
    index_dtype = torch.int32 if fits_int32 else torch.int64

    # pixel coordinates (grid_sample, align_corners=False): pixel j's centre is at x = j.
    # Clamping to [-1, size] changes nothing inside the map and its one-pixel border (all
    # corners of a point outside that range lie outside the map); the lower corner is then
    # clamped to [-1, size - 1], so both corners lie in the padded level.
    size_xy = torch.tensor([[w, h] for h, w in shapes], dtype=work, device=device)[:, None, :]  # L,1,2
    pix = sampling_locations.to(work) * size_xy - 0.5  # B, Q, M, L, P, 2
    pix = torch.clamp(pix, pix.new_tensor(-1.0), size_xy)
    corner = torch.clamp(pix.detach().floor(), pix.new_tensor(-1.0), size_xy - 1)
    # a NaN location: a valid row, and NaN out (as grid_sample)
    corner = (torch.where(torch.isnan(corner), corner.new_tensor(-1.0), corner) if exporting
              else corner.nan_to_num_(-1.0))
    frac = pix - corner  # in [0, 1]; carries the location gradient

    # row of the (lower x, lower y) corner: (b * S' + start'_l + (y + 1) * (W_l + 2) + x + 1) * M + m
    step = torch.tensor([[m, (w + 2) * m] for _, w in shapes], dtype=index_dtype, device=device)[:, None, :]
    level_base = torch.tensor([(st + w + 3) * m for st, (_, w) in zip(starts, shapes)], device=device)
    base = ((torch.arange(b, device=device).view(b, 1, 1) * (s_pad * m) + level_base.view(1, 1, -1))
            + torch.arange(m, device=device).view(1, m, 1)).view(b, 1, m, num_levels, 1)
    first = (corner.to(index_dtype) * step).sum(-1, dtype=index_dtype) + base.to(index_dtype)  # B, Q, M, L, P
    corner_steps = torch.tensor([[0, m, (w + 2) * m, (w + 3) * m] for _, w in shapes],
                                dtype=index_dtype, device=device)[:, None, :]  # L, 1, 4
    rows = first[..., None] + corner_steps  # B, Q, M, L, P, 4

    fx, fy = frac.unbind(-1)
    attn = attention_weights.to(work)
    low_y, high_y, low_x = attn - attn * fy, attn * fy, 1 - fx
    # in the order of corner_steps: (y, x) = (low, low), (low, up), (up, low), (up, up)
    corner_weights = torch.stack([low_y * low_x, low_y * fx, high_y * low_x, high_y * fx], dim=-1)

    bags = b * q * m
    rows, table = rows.reshape(bags, num_levels * p * 4), padded.reshape(b * s_pad * m, d)
    corner_weights = corner_weights.reshape(bags, -1).to(value.dtype)
    if exporting:  # ONNX has no weighted EmbeddingBag: Gather the rows, one batched MatMul
        picked = F.embedding(rows, table)  # bags, L * P * 4, D
        return torch.matmul(corner_weights.unsqueeze(1), picked).view(b, q, m * d)
    out = F.embedding_bag(rows, table, mode="sum", per_sample_weights=corner_weights)
    return out.view(b, q, m * d)


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
            reference_points: ``(B, Q, L, 2)`` normalised ``(x, y)`` per query and level; best
                float32 (or float64) even when the module runs in lower precision. The sampling
                locations and the attention-weight softmax are computed in the promoted dtype of
                the reference points, the offsets and float32.
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
        logits = self.attention_weights(query).view(b, q, m, lv * p)
        # Locations and the softmax in at least float32, whatever the projections ran in (bf16
        # under autocast): a bf16 location is quantised to ~1/4 pixel on a 128-wide map.
        work = torch.promote_types(torch.promote_types(offsets.dtype, reference_points.dtype),
                                   torch.float32)
        weights = logits.to(work).softmax(-1).view(b, q, m, lv, p)
        # offsets are in pixels of each level: normalise by (W_l, H_l)
        normaliser = spatial_shapes.flip(-1).to(work)  # (L, 2) as (W, H)
        locations = (reference_points.to(work)[:, :, None, :, None, :]
                     + offsets.to(work) / normaliser[:, None, :])

        out = ms_deform_attn(value, spatial_shapes, locations, weights)
        return self.dropout(self.output_proj(out)) + identity
