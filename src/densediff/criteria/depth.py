"""Monocular depth estimation: the training losses, the evaluation metrics and uncertainty.

Semantics follow the code DDP (Ji et al., "DDP: Diffusion Model for Dense Visual Prediction",
ICCV 2023) builds on for depth: the Monocular-Depth-Estimation-Toolbox / DepthFormer
(``depth/models/losses/sigloss.py``, ``depth/core/evaluation/metrics.py``,
``depth/datasets/kitti.py``), DDP's own ``depth/depth/models/losses/sigloss.py``, and the BTS
evaluation script (``utils/eval_with_pngs.py``, Lee et al. 2019), whose crops and metric
definitions the toolbox copies.

* :func:`valid_mask` -- pixels with usable ground truth.
* :func:`sig_loss` -- the scale-invariant log loss (Eigen et al. 2014) as DDP trains with it.
* :func:`gradient_loss` -- multi-scale gradient matching of the log-depth residual (Li &
  Snavely 2018, MegaDepth; Ranftl et al. 2020, MiDaS).
* :func:`eval_crop_mask` -- the Garg / Eigen evaluation crops of KITTI and the Eigen crop of
  NYU-Depth-v2.
* :func:`depth_errors` -- the nine standard metrics of one image.
* :class:`DepthMetric` -- the metrics averaged over the images of a dataset (a
  :class:`torchmetrics.Metric`, summed across processes); :func:`format_depth_metrics` prints
  them.
* :func:`depth_spread` -- per-pixel spread of several depth predictions (an uncertainty map).
* :func:`sparsification_curves` / :class:`DepthUncertaintyMetric` -- how well an uncertainty
  map ranks the depth errors: Pearson correlation and AUSE (Ilg et al. 2018; Poggi et al.
  2020).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from densediff.criteria.base import DatasetMetric, stack_steps

__all__ = [
    "METRIC_KEYS",
    "valid_mask",
    "sig_loss",
    "gradient_loss",
    "eval_crop_mask",
    "depth_errors",
    "DepthMetric",
    "format_depth_metrics",
    "depth_spread",
    "sparsification_curves",
    "DepthUncertaintyMetric",
]

METRIC_KEYS = ("d1", "d2", "d3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog")
"""Keys of :func:`depth_errors` and :meth:`DepthMetric.compute`, in reporting order (the depth
task's metrics in :data:`densediff.tasks.TASKS`, which also says which are lower-is-better)."""

CROPS = ("none", "garg", "eigen", "nyu_eigen")

_SQRT_FLOOR = 1e-12
"""Lower bound of the argument of the square root in :func:`sig_loss` (see there)."""


# --------------------------------------------------------------------------------------------
# masks


def valid_mask(gt: torch.Tensor, min_depth: float, max_depth: float) -> torch.Tensor:
    """Pixels with usable ground truth: ``(gt > min_depth) & (gt < max_depth) & isfinite(gt)``.

    Both bounds are strict, as in the toolbox (``metrics``) and BTS (``eval``); a GT of 0 marks
    a pixel without measurement (KITTI's sparse LiDAR maps, NYU's holes) and is excluded for any
    ``min_depth >= 0``.

    Returns:
        bool tensor of ``gt``'s shape.
    """
    return (gt > min_depth) & (gt < max_depth) & torch.isfinite(gt)


def eval_crop_mask(height: int, width: int, crop: str = "none",
                   device: torch.device | str | None = None) -> torch.Tensor:
    """The evaluation crop as an H x W bool mask (True inside the crop).

    * ``"none"``: everything.
    * ``"garg"`` (KITTI, Garg et al. ECCV 2016): rows ``[int(0.40810811 h), int(0.99189189 h))``,
      cols ``[int(0.03594771 w), int(0.96405229 w))``.
    * ``"eigen"`` (KITTI, Eigen et al. NIPS 2014): rows ``[int(0.3324324 h),
      int(0.91351351 h))``, cols ``[int(0.0359477 w), int(0.96405229 w))``.

      Both with exactly these constants and Python ``int`` truncation of the float products,
      as in BTS ``utils/eval_with_pngs.py`` and the toolbox ``KITTIDataset.eval_mask``. For the
      raw 375 x 1242 KITTI frame: Garg rows 153:371, cols 44:1197; Eigen rows 124:342, cols
      44:1197. (The toolbox applies it after its 352 x 1216 KB crop: Garg rows 143:349, cols
      43:1172.)
    * ``"nyu_eigen"`` (NYU-Depth-v2): rows 45:471, cols 41:601 of a 480 x 640 frame (BTS's
      ``eval_mask[45:471, 41:601]``, which is hard-coded for 480 x 640). Other sizes get the
      proportional crop with integer floor division: rows ``[45 h // 480, 471 h // 480)``,
      cols ``[41 w // 640, 601 w // 640)`` (exactly the BTS crop at 480 x 640).

    Returns:
        H x W bool tensor on ``device`` (default CPU).
    """
    if height < 1 or width < 1:
        raise ValueError(f"crop size must be positive, got {height} x {width}")
    mask = torch.zeros(height, width, dtype=torch.bool, device=device)
    if crop == "none":
        mask[:] = True
    elif crop == "garg":
        mask[int(0.40810811 * height):int(0.99189189 * height),
             int(0.03594771 * width):int(0.96405229 * width)] = True
    elif crop == "eigen":
        mask[int(0.3324324 * height):int(0.91351351 * height),
             int(0.0359477 * width):int(0.96405229 * width)] = True
    elif crop == "nyu_eigen":
        mask[45 * height // 480:471 * height // 480, 41 * width // 640:601 * width // 640] = True
    else:
        raise ValueError(f"unknown crop {crop!r}; expected one of {CROPS}")
    return mask


# --------------------------------------------------------------------------------------------
# losses


def _check_loss_inputs(pred: torch.Tensor, gt: torch.Tensor,
                       valid: torch.Tensor | None) -> torch.Tensor:
    if pred.shape != gt.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and gt {tuple(gt.shape)} must have the same "
                         "shape (upsample the prediction first)")
    if valid is None:
        valid = (gt > 0) & torch.isfinite(gt)
    if valid.shape != gt.shape or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor of shape {tuple(gt.shape)}")
    return valid


def _loss_dtype(x: torch.Tensor) -> torch.Tensor:
    """float32 for half / bfloat16 inputs (the log residual and the floors need it)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def sig_loss(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor | None = None,
             variance_focus: float = 0.15, eps: float = 1e-3) -> torch.Tensor:
    """Scale-invariant log loss, as DDP's ``SigLoss`` (Eigen et al. 2014, via AdaBins).

    With ``g_i = log(pred_i + eps) - log(gt_i + eps)`` over the N valid pixels of the whole
    batch (pooled, not per image)::

        loss = sqrt( Var(g) + variance_focus * mean(g)^2 ),
        Var(g) = sum_i (g_i - mean(g))^2 / (N - 1)      (unbiased, torch.var's default)

    Checked against DDP ``depth/depth/models/losses/sigloss.py`` (JiYuanFeng/DDP): ``eps =
    0.001`` added to both maps, ``torch.var(g) + 0.15 * torch.pow(torch.mean(g), 2)``, then
    ``torch.sqrt``; valid pixels ``target > 0`` (DDP's depth configs use no ``max_depth`` and
    no warm-up). The toolbox's own ``SigLoss`` is the same without ``eps``. No factor 10 (BTS
    and AdaBins multiply by 10; DDP does not). Differences from the official code:

    * ``valid`` is passed in (``None``: ``gt > 0`` and finite, the official mask).
    * No valid pixel: ``pred.sum() * 0`` (the official gives NaN), a zero that keeps the graph.
    * One valid pixel: the variance term is 0 (``torch.var`` of one value is NaN).
    * The argument of the square root is clamped below at ``1e-12``: ``d sqrt(x)/dx`` is
      infinite at 0, and ``Var(g) + lambda mean(g)^2`` is exactly 0 for a perfect prediction
      (0 * inf = NaN gradients). Below the floor the gradient is 0 and the loss ``1e-6``.
    * half / bfloat16 inputs are computed in float32.

    Args:
        pred: predicted depth (B x 1 x H x W or B x H x W), > ``-eps`` on valid pixels.
        gt: ground-truth depth, same shape.
        valid: bool mask of the pixels to use, same shape.
        variance_focus: lambda, the weight of the squared mean (0.15 in DDP / AdaBins).
        eps: added to both depths before the log (DDP: 1e-3).

    Returns:
        Scalar loss tensor.
    """
    valid = _check_loss_inputs(pred, gt, valid)
    if not bool(valid.any()):
        return pred.sum() * 0
    p = _loss_dtype(pred[valid])
    t = _loss_dtype(gt[valid]).to(p.dtype)
    g = torch.log(p + eps) - torch.log(t + eps)
    var = torch.var(g) if g.numel() > 1 else g.sum() * 0
    dg = var + variance_focus * torch.mean(g) ** 2
    return torch.sqrt(dg.clamp(min=_SQRT_FLOOR))


def gradient_loss(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor | None = None,
                  scales: int = 4, eps: float = 1e-3) -> torch.Tensor:
    """Multi-scale gradient matching of the log-depth residual (MegaDepth; MiDaS).

    With ``R = log(pred + eps) - log(gt + eps)`` and, at scale ``k = 0 .. scales - 1``, the maps
    subsampled with stride ``s = 2^k`` (``R[..., ::s, ::s]``, same for ``valid``)::

        L_k = ( sum |R[y, x+1] - R[y, x]| over horizontal pairs with both pixels valid
              + sum |R[y+1, x] - R[y, x]| over vertical pairs with both pixels valid )
              / (number of valid pixels at scale k)

        loss = sum_k L_k

    Sums and counts are pooled over the batch, and the scale terms are summed, not averaged,
    as in MiDaS's ``GradientLoss`` (``reduction_batch_based``, ``total += gradient_loss(
    prediction[:, ::step, ::step], ...)``, 4 scales; Ranftl et al. 2020, who apply it to the
    scale-and-shift aligned disparity residual) -- here on the log-depth residual of Li &
    Snavely 2018 (MegaDepth), where a prediction off by a constant factor has a constant
    residual and costs nothing. A scale without valid pixels contributes 0. Invalid pixels
    never enter a log (they are replaced by 1 first), so they get zero, never NaN, gradients.

    Args:
        pred: predicted depth (B x 1 x H x W or B x H x W).
        gt: ground-truth depth, same shape.
        valid: bool mask, same shape (``None``: ``gt > 0`` and finite).
        scales: number of scales (>= 1).
        eps: added to both depths before the log.

    Returns:
        Scalar loss tensor; ``pred.sum() * 0`` when no pixel is valid.
    """
    valid = _check_loss_inputs(pred, gt, valid)
    if scales < 1:
        raise ValueError(f"scales must be >= 1, got {scales}")
    if pred.dim() < 2:
        raise ValueError("pred must have at least two (spatial) dimensions")
    if not bool(valid.any()):
        return pred.sum() * 0
    p = _loss_dtype(pred)
    one = torch.ones((), dtype=p.dtype, device=p.device)
    p = torch.where(valid, p, one)
    t = torch.where(valid, _loss_dtype(gt).to(p.dtype), one)
    res = torch.log(p + eps) - torch.log(t + eps)
    total = pred.sum() * 0
    for k in range(scales):
        s = 2 ** k
        r = res[..., ::s, ::s]
        v = valid[..., ::s, ::s]
        n = v.sum()
        if int(n) == 0:
            continue
        vx = v[..., :, 1:] & v[..., :, :-1]
        vy = v[..., 1:, :] & v[..., :-1, :]
        gx = (r[..., :, 1:] - r[..., :, :-1]).abs()
        gy = (r[..., 1:, :] - r[..., :-1, :]).abs()
        zero = torch.zeros((), dtype=r.dtype, device=r.device)
        total = total + (torch.where(vx, gx, zero).sum() + torch.where(vy, gy, zero).sum()) / n
    return total


# --------------------------------------------------------------------------------------------
# metrics of one image


def _errors_tensor(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """The :data:`METRIC_KEYS` values of 1-D ``pred`` / ``gt`` as one float64 tensor (9,)."""
    pred = pred.to(torch.float64)
    gt = gt.to(pred.device, torch.float64)
    if pred.numel() == 0:
        return torch.full((len(METRIC_KEYS),), float("nan"), dtype=torch.float64,
                          device=pred.device)
    thresh = torch.maximum(gt / pred, pred / gt)
    diff = gt - pred
    log_diff = torch.log(pred) - torch.log(gt)  # e
    return torch.stack([
        (thresh < 1.25).double().mean(),
        (thresh < 1.25 ** 2).double().mean(),
        (thresh < 1.25 ** 3).double().mean(),
        (diff.abs() / gt).mean(),
        (diff ** 2 / gt).mean(),
        (diff ** 2).mean().sqrt(),
        (log_diff ** 2).mean().sqrt(),
        (torch.log10(gt) - torch.log10(pred)).abs().mean(),
        ((log_diff ** 2).mean() - log_diff.mean() ** 2).clamp(min=0).sqrt() * 100,
    ])


def depth_errors(pred: torch.Tensor, gt: torch.Tensor) -> dict:
    """The nine standard depth metrics of one image, from its valid pixels.

    For 1-D ``pred`` and ``gt`` (positive, the valid pixels of one image), computed in float64,
    with ``e = log(pred) - log(gt)``:

    * ``d1`` / ``d2`` / ``d3``: ``mean(max(gt / pred, pred / gt) < 1.25^k)``, k = 1, 2, 3
      (fractions in [0, 1]; the toolbox calls them a1 / a2 / a3);
    * ``abs_rel = mean(|gt - pred| / gt)``; ``sq_rel = mean((gt - pred)^2 / gt)`` (in metres);
    * ``rmse = sqrt(mean((gt - pred)^2))`` (in the depth unit, metres);
    * ``rmse_log = sqrt(mean((log gt - log pred)^2))``;
    * ``log10 = mean(|log10 gt - log10 pred|)``;
    * ``silog = 100 * sqrt(mean(e^2) - mean(e)^2)`` (the KITTI benchmark's SILog, log-metres
      x 100).

    Identical to ``calculate`` in the toolbox's ``depth/core/evaluation/metrics.py`` and to
    ``compute_errors`` in BTS ``utils/eval_with_pngs.py`` (which both compute in numpy with
    float32 maps). One difference: the argument of the silog square root is clamped at 0,
    where rounding makes it slightly negative for (near-)constant ``e``; the toolbox turns the
    resulting NaN into 0 afterwards, BTS reports NaN.

    Returns:
        dict ``{key: float}`` for the keys of :data:`METRIC_KEYS`; all NaN for empty inputs
        (as the toolbox).
    """
    if pred.shape != gt.shape or pred.dim() != 1:
        raise ValueError(f"pred {tuple(pred.shape)} and gt {tuple(gt.shape)} must be 1-D tensors "
                         "of the same length")
    vals = _errors_tensor(pred, gt).cpu().tolist()
    return dict(zip(METRIC_KEYS, vals))


# --------------------------------------------------------------------------------------------
# dataset metric


def _check_range(min_depth: float, max_depth: float) -> None:
    if not 0 < min_depth < max_depth:
        raise ValueError(f"need 0 < min_depth < max_depth, got {min_depth}, {max_depth}")


def _clamp_pred(pred: torch.Tensor, min_depth: float, max_depth: float) -> torch.Tensor:
    """BTS / AdaBins prediction cap: clamp to ``[min_depth, max_depth]``, ``+inf -> max``,
    ``-inf -> min``, ``NaN -> min`` (AdaBins ``evaluate.py``; BTS leaves NaN alone)."""
    pred = torch.nan_to_num(pred, nan=min_depth, posinf=max_depth, neginf=min_depth)
    return pred.clamp(min_depth, max_depth)


def _as_images(x: torch.Tensor | Sequence[torch.Tensor], name: str) -> list[torch.Tensor]:
    """Split a B x H x W (or B x 1 x H x W, or H x W) tensor or a list of H x W maps."""
    if isinstance(x, torch.Tensor):
        if x.dim() == 4 and x.shape[1] == 1:
            x = x[:, 0]
        if x.dim() == 2:
            x = x[None]
        if x.dim() != 3:
            raise ValueError(f"{name} must be B x H x W, got {tuple(x.shape)}")
        return list(x.unbind(0))
    out = []
    for m in x:
        if m.dim() == 3 and m.shape[0] == 1:
            m = m[0]
        if m.dim() != 2:
            raise ValueError(f"each {name} map must be H x W, got {tuple(m.shape)}")
        out.append(m)
    return out


class _EvaluatedPixels(DatasetMetric):
    """What both dataset-level depth scores share: the GT range, the evaluation crop and the
    mask of evaluated pixels (``valid_mask & eval_crop_mask``, crops cached per size and
    device)."""

    def __init__(self, min_depth: float, max_depth: float, crop: str, **kwargs: Any):
        _check_range(min_depth, max_depth)
        if crop not in CROPS:
            raise ValueError(f"unknown crop {crop!r}; expected one of {CROPS}")
        super().__init__(**kwargs)
        self.min_depth = float(min_depth)
        self.max_depth = float(max_depth)
        self.crop = crop
        self._crops: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def _eval_mask(self, gt: torch.Tensor) -> torch.Tensor:
        key = (gt.shape[-2], gt.shape[-1], gt.device)
        if key not in self._crops:
            self._crops[key] = eval_crop_mask(*key[:2], self.crop, device=gt.device)
        return valid_mask(gt, self.min_depth, self.max_depth) & self._crops[key]


class DepthMetric(_EvaluatedPixels):
    """Dataset-level depth metrics: the per-image :func:`depth_errors`, averaged over images.

    A :class:`torchmetrics.Metric` (see :mod:`densediff.criteria.base`): call :meth:`update` per
    batch, then ``compute()``; under ``torch.distributed`` ``compute`` sums the accumulators
    of all processes first (``reduce()`` does it explicitly).

    Per image: the evaluated pixels are ``valid_mask(gt, min_depth, max_depth) &
    eval_crop_mask(H, W, crop)``; the prediction is capped as in BTS / AdaBins evaluation
    (clamped to ``[min_depth, max_depth]``, ``+inf -> max_depth``, ``-inf`` and ``NaN ->
    min_depth``); the nine metrics of :func:`depth_errors` are computed on those pixels. The
    dataset value of each metric is the MEAN OVER IMAGES of the per-image values (as BTS
    ``eval`` and the toolbox ``pre_eval_to_metrics`` report), not a mean over all pixels.
    Images with no evaluated pixel are skipped (the toolbox's NaN entries that ``nanmean``
    drops) and counted in ``skipped``.

    Accumulators (float64 states summed over processes, on the metric's device; ``.to(device)``
    moves them): ``sums``, the 9 per-image sums, ``images``, the number of images counted, and
    ``skipped``.

    Args:
        min_depth, max_depth: GT range evaluated and prediction cap (toolbox: 1e-3 and 80 for
            KITTI, 1e-3 and 10 for NYU); ``0 < min_depth < max_depth``.
        crop: evaluation crop, see :func:`eval_crop_mask` (KITTI: ``"garg"``; NYU:
            ``"nyu_eigen"``).
        device: where the accumulators live and the metrics are computed; None: CPU.
        **kwargs: :class:`torchmetrics.Metric`'s, see :class:`~densediff.criteria.base.DatasetMetric`.
    """

    def __init__(self, min_depth: float, max_depth: float, crop: str = "none",
                 device: torch.device | str | None = None, **kwargs: Any):
        super().__init__(min_depth, max_depth, crop, **kwargs)
        f64 = torch.float64
        self.add_state("sums", torch.zeros(len(METRIC_KEYS), dtype=f64), dist_reduce_fx="sum")
        self.add_state("images", torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        self.add_state("skipped", torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        self.to(device if device is not None else "cpu")

    # ---------------------------------------------------------------- accumulation

    def update(self, pred: torch.Tensor | Sequence[torch.Tensor],
               gt: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Add a batch.

        Args:
            pred: B x H x W (or B x 1 x H x W) predicted depth, or a list of H_i x W_i maps.
            gt: ground-truth depth at the same size(s); values outside ``(min_depth,
                max_depth)`` and non-finite ones are not evaluated.
        """
        self._check_not_synced()
        preds, gts = _as_images(pred, "pred"), _as_images(gt, "gt")
        if len(preds) != len(gts):
            raise ValueError(f"got {len(preds)} predictions for {len(gts)} GT maps")
        for p, g in zip(preds, gts):
            if p.shape != g.shape:
                raise ValueError(f"pred {tuple(p.shape)} and gt {tuple(g.shape)} differ in size")
            p = p.detach().to(self.device, torch.float64)
            g = g.detach().to(self.device, torch.float64)
            m = self._eval_mask(g)
            if not bool(m.any()):
                self.skipped += 1
                continue
            p = _clamp_pred(p[m], self.min_depth, self.max_depth)
            self.sums += _errors_tensor(p, g[m])
            self.images += 1

    # ---------------------------------------------------------------- results

    def compute(self) -> dict:
        """Mean over the counted images.

        Returns:
            dict with floats ``d1 d2 d3`` (fractions in [0, 1]), ``abs_rel``, ``sq_rel``,
            ``rmse``, ``rmse_log``, ``log10`` (in the units of :func:`depth_errors`: rmse and
            sq_rel in the depth unit, metres; the others unitless), ``silog`` (x 100), all NaN
            when no image was counted; and the ints ``images`` (counted) and ``skipped`` (no
            evaluated pixel).
        """
        n = int(round(float(self.images)))
        vals = (self.sums.double().cpu() / n).tolist() if n else [float("nan")] * len(METRIC_KEYS)
        out = dict(zip(METRIC_KEYS, vals))
        out["images"] = n
        out["skipped"] = int(round(float(self.skipped)))
        return out

    def format_table(self) -> str:
        """:meth:`compute`'s results as a table, see :func:`format_depth_metrics`."""
        return format_depth_metrics(self.compute())


def format_depth_metrics(metrics: dict) -> str:
    """Plain-text one-row table of :meth:`DepthMetric.compute` results.

    A header with the nine :data:`METRIC_KEYS` (and ``images`` when present), a rule, and the
    values with 4 decimals (NaN shown as ``nan``). Works on the dict after a JSON round trip.
    """
    keys = list(METRIC_KEYS)
    cells = [f"{float(metrics[k]):.4f}" for k in keys]
    if "images" in metrics:
        keys.append("images")
        cells.append(str(int(metrics["images"])))
    widths = [max(len(k), len(c)) for k, c in zip(keys, cells)]
    head = " | ".join(f"{k:>{w}}" for k, w in zip(keys, widths))
    row = " | ".join(f"{c:>{w}}" for c, w in zip(cells, widths))
    return "\n".join([head, "-" * len(head), row])


# --------------------------------------------------------------------------------------------
# uncertainty


def depth_spread(samples: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-pixel standard deviation over a leading dimension, as an uncertainty map.

    For S depth predictions of the same image(s) -- e.g. the outputs of the S sampling steps
    of the diffusion decoder, or of S random starts -- the POPULATION standard deviation
    ``sqrt(mean_s (x_s - mean_s x_s)^2)`` (``correction=0``; the spread of the given maps, not an
    estimate of a wider distribution: S = 1 gives 0 rather than NaN).

    Args:
        samples: S x ... float tensor (e.g. S x B x H x W), or a sequence of S equal-shaped maps.

    Returns:
        float tensor of the trailing shape (float32 for half / bfloat16 input).
    """
    samples = stack_steps(samples, "samples")
    if not samples.is_floating_point():
        samples = samples.float()
    return torch.std(_loss_dtype(samples), dim=0, correction=0)


def _removed_counts(n: int, fractions: int, device: torch.device) -> torch.Tensor:
    """Pixels removed at ``f = k / F``: ``ceil(k (n - 1) / F)``, k = 0 .. F - 1 (int64)."""
    k = torch.arange(fractions, dtype=torch.int64, device=device)
    return (k * (n - 1) + fractions - 1) // fractions


def _remaining_means(values_sorted: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """Mean of ``values_sorted[r:]`` for every r in ``removed`` (suffix sums, one pass)."""
    suffix = values_sorted.flip(0).cumsum(0).flip(0)
    n = values_sorted.numel()
    return suffix[removed] / (n - removed).to(values_sorted.dtype)


def sparsification_curves(uncertainty: torch.Tensor, pred: torch.Tensor, gt: torch.Tensor,
                          fractions: int = 20) -> dict:
    """Sparsification and oracle curves of abs_rel and rmse for the pixels of one image.

    Ilg et al. 2018 ("Uncertainty Estimates and Multi-Hypotheses Networks for Optical Flow");
    Poggi et al. 2020 ("On the uncertainty of self-supervised monocular depth estimation",
    ``compute_aucs`` in mattpoggi/mono-uncertainty ``evaluate.py``). For f = k / F,
    k = 0 .. F - 1, the ``r_k`` most uncertain pixels are removed and the metric is computed on
    the rest; the oracle removes the ``r_k`` pixels of largest true error (for abs_rel the
    largest ``|pred - gt| / gt``, for rmse the largest ``(pred - gt)^2``, as Poggi's
    ``true_uncert``).

    ``r_k = ceil(k (n - 1) / F)``: the count Poggi's selection ``uncert >= np.percentile(uncert,
    100 k / F)`` (linear interpolation) removes when there are no ties, computed in integer
    arithmetic. At least one pixel always remains. Ties are broken by pixel order (a stable
    descending sort) instead of keeping all pixels tied at the threshold.

    Vectorised: one sort per ranking and suffix sums give every remaining subset, O(n log n).

    Args:
        uncertainty, pred, gt: 1-D tensors of the evaluated pixels (n >= 1), gt > 0, pred > 0.
        fractions: F >= 1.

    Returns:
        dict of float64 tensors of length F: ``fraction`` (k / F), ``abs_rel``,
        ``abs_rel_oracle``, ``rmse``, ``rmse_oracle``.
    """
    if not (uncertainty.shape == pred.shape == gt.shape) or pred.dim() != 1:
        raise ValueError("uncertainty, pred and gt must be 1-D tensors of the same length")
    n = pred.numel()
    if n < 1:
        raise ValueError("need at least one pixel")
    if fractions < 1:
        raise ValueError(f"fractions must be >= 1, got {fractions}")
    dev = pred.device
    u = uncertainty.to(dev, torch.float64)
    p = pred.to(torch.float64)
    g = gt.to(dev, torch.float64)
    err_rel = (p - g).abs() / g
    err_sq = (p - g) ** 2
    removed = _removed_counts(n, fractions, dev)

    order = torch.sort(u, descending=True, stable=True).indices
    rel_sorted = torch.sort(err_rel, descending=True, stable=True).values
    sq_sorted = torch.sort(err_sq, descending=True, stable=True).values
    return {
        "fraction": torch.arange(fractions, dtype=torch.float64, device=dev) / fractions,
        "abs_rel": _remaining_means(err_rel[order], removed),
        "abs_rel_oracle": _remaining_means(rel_sorted, removed),
        "rmse": _remaining_means(err_sq[order], removed).sqrt(),
        "rmse_oracle": _remaining_means(sq_sorted, removed).sqrt(),
    }


def _ause(curve: torch.Tensor, oracle: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Poggi's ``np.trapz(curve + [0], x) - np.trapz(oracle + [0], x)`` on x = 0, 1/F, .., 1."""
    if normalize:
        ref = curve[0]
        if float(ref) == 0.0:
            return torch.zeros((), dtype=curve.dtype, device=curve.device)
        curve, oracle = curve / ref, oracle / ref
    d = curve - oracle
    return (d.sum() - 0.5 * d[0]) / d.numel()


class DepthUncertaintyMetric(_EvaluatedPixels):
    """Dataset-level quality of a depth uncertainty map: Pearson correlation and AUSE.

    A :class:`torchmetrics.Metric` like :class:`DepthMetric` (one float64 state ``acc`` of
    sums, summed over processes by ``compute`` or ``reduce()``). Pixels and prediction cap as in
    :class:`DepthMetric` (``valid_mask & eval_crop_mask``; prediction clamped, non-finite
    values replaced).

    * ``pearson``: the Pearson correlation between the uncertainty and the absolute relative
      error ``|pred - gt| / gt`` over ALL evaluated pixels of the dataset, from the float64 sums
      of x, y, x^2, y^2, xy and the count. NaN when fewer than 2 pixels or a constant variable
      (a variance below ``1e-12`` times the variable's mean square counts as 0).
    * ``ause_abs_rel`` / ``ause_rmse``: per image, the area between the sparsification curve
      and its oracle (:func:`sparsification_curves`), integrated as Poggi et al. 2020 do
      (``np.trapz`` over f = 0, 1/F, ..., 1 of the curves with 0 appended at f = 1). The
      difference is 0 at f = 0 and at f = 1, so this is exactly the mean over the F fractions
      of ``curve - oracle``. Averaged over images (Poggi: mean of the per-image AUSE).
      Poggi's reference code (``compute_aucs``) does NOT normalise the curves: the default
      ``normalize=False`` follows it (AUSE in the metric's units: abs_rel unitless, rmse in
      metres). ``normalize=True`` divides both curves by their common value at f = 0 (the
      image's abs_rel / rmse), the normalised plots of Ilg et al. 2018; an image with zero
      error then contributes 0.
    * ``images`` / ``skipped``: images counted / without evaluated pixels.

    Args:
        min_depth, max_depth, crop: as :class:`DepthMetric`.
        fractions: F, the number of sparsification steps (Poggi: 50 -- ``intervals``).
        normalize: see above.
        device: where the accumulators live and the metrics are computed; None: CPU.
        **kwargs: :class:`torchmetrics.Metric`'s, see :class:`~densediff.criteria.base.DatasetMetric`.
    """

    def __init__(self, min_depth: float, max_depth: float, crop: str = "none",
                 fractions: int = 20, normalize: bool = False,
                 device: torch.device | str | None = None, **kwargs: Any):
        if fractions < 1:
            raise ValueError(f"fractions must be >= 1, got {fractions}")
        super().__init__(min_depth, max_depth, crop, **kwargs)
        self.fractions = int(fractions)
        self.normalize = bool(normalize)
        self.add_state("acc", torch.zeros(self._N, dtype=torch.float64), dist_reduce_fx="sum")
        self.to(device if device is not None else "cpu")

    _N = 10  # n, sx, sy, sxx, syy, sxy, ause_abs_rel, ause_rmse, images, skipped

    def update(self, uncertainty: torch.Tensor | Sequence[torch.Tensor],
               pred: torch.Tensor | Sequence[torch.Tensor],
               gt: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Add a batch.

        Args:
            uncertainty: B x H x W uncertainty (higher = less certain; finite on evaluated
                pixels), or a list of H_i x W_i maps.
            pred: predicted depth, same shape(s).
            gt: ground-truth depth, same shape(s).
        """
        self._check_not_synced()
        us = _as_images(uncertainty, "uncertainty")
        ps, gs = _as_images(pred, "pred"), _as_images(gt, "gt")
        if not len(us) == len(ps) == len(gs):
            raise ValueError(f"got {len(us)} uncertainty, {len(ps)} prediction and {len(gs)} "
                             "GT maps")
        for u, p, g in zip(us, ps, gs):
            if not u.shape == p.shape == g.shape:
                raise ValueError(f"uncertainty {tuple(u.shape)}, pred {tuple(p.shape)} and gt "
                                 f"{tuple(g.shape)} differ in size")
            g = g.detach().to(self.device, torch.float64)
            m = self._eval_mask(g)
            if not bool(m.any()):
                self.acc[9] += 1
                continue
            x = u.detach().to(self.device, torch.float64)[m]
            if not bool(torch.isfinite(x).all()):
                raise ValueError("uncertainty must be finite on the evaluated pixels")
            pv = _clamp_pred(p.detach().to(self.device, torch.float64)[m], self.min_depth,
                             self.max_depth)
            gv = g[m]
            y = (pv - gv).abs() / gv
            curves = sparsification_curves(x, pv, gv, self.fractions)
            self.acc += torch.stack([
                torch.tensor(float(x.numel()), dtype=torch.float64, device=self.device),
                x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum(),
                _ause(curves["abs_rel"], curves["abs_rel_oracle"], self.normalize),
                _ause(curves["rmse"], curves["rmse_oracle"], self.normalize),
                torch.ones((), dtype=torch.float64, device=self.device),
                torch.zeros((), dtype=torch.float64, device=self.device),
            ])

    def compute(self) -> dict:
        """Results, see the class doc.

        Returns:
            dict with floats ``pearson``, ``ause_abs_rel``, ``ause_rmse`` (NaN where undefined)
            and the ints ``images``, ``skipped``.
        """
        n, sx, sy, sxx, syy, sxy, a_rel, a_rmse, images, skipped = self.acc.cpu().tolist()
        nan = float("nan")
        pearson = nan
        if n >= 2:
            cov = sxy / n - (sx / n) * (sy / n)
            vx = sxx / n - (sx / n) ** 2
            vy = syy / n - (sy / n) ** 2
            # variances below 1e-12 of the raw second moment are rounding noise of a constant
            if vx > 1e-12 * (sxx / n) and vy > 1e-12 * (syy / n):
                pearson = max(-1.0, min(1.0, cov / math.sqrt(vx * vy)))
        k = int(round(images))
        return {
            "pearson": pearson,
            "ause_abs_rel": a_rel / k if k else nan,
            "ause_rmse": a_rmse / k if k else nan,
            "images": k,
            "skipped": int(round(skipped)),
        }


def best_constant_depth(gts: Sequence[torch.Tensor], min_depth: float, max_depth: float,
                        crop: str = "none") -> tuple[float, dict]:
    """The constant-depth predictor with the lowest AbsRel on ``gts`` (an oracle baseline: the
    constant is fitted on the very maps it is scored on), and its :class:`DepthMetric` results.

    AbsRel averaged over images is ``sum_p w_p |gt_p - c|`` with ``w_p = 1 / (n_i gt_p)`` over
    the valid pixels p of image i (n_i of them), which a weighted median of the GT depths
    minimises exactly.

    Returns:
        ``(depth, metrics)``.
    """
    values, weights = [], []
    for gt in gts:
        gt = gt.reshape(-1, *gt.shape[-2:])
        for g in gt:
            v = g[valid_mask(g, min_depth, max_depth)
                  & eval_crop_mask(*g.shape[-2:], crop, device=g.device)].double()
            if v.numel():
                values.append(v)
                weights.append(1.0 / (v * v.numel()))
    if not values:
        raise ValueError("no valid ground-truth pixel")
    v, w = torch.cat(values), torch.cat(weights)
    order = v.argsort()
    cum = w[order].cumsum(0)
    c = float(v[order][torch.searchsorted(cum, cum[-1] / 2)].clamp(min_depth, max_depth))
    metric = DepthMetric(min_depth, max_depth, crop, sync_on_compute=False)  # the given maps only
    for gt in gts:
        metric.update(torch.full_like(gt, c), gt)
    return c, metric.compute()
