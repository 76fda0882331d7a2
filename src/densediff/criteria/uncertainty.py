"""Pixel-wise uncertainty of the iterative sampler, and how well it flags wrong pixels.

DDP (Ji et al., "DDP: Diffusion Model for Dense Visual Prediction", ICCV 2023), §3.4
"Uncertainty Awareness": the multi-step sampler comes with a free uncertainty estimate --
"count the pixels where the predicted result of each step differs from the result of the
previous step, and finally normalize this change count map to 0-1" (their Fig. 3c shows that
the high-uncertainty pixels coincide with the wrong ones).

* :func:`step_change_uncertainty` -- the paper's estimator: the share of sampling steps at
  which a pixel's label changed.
* :func:`entropy_uncertainty` -- the normalised Shannon entropy of the accumulated
  (step-averaged) class probabilities, an alternative continuous estimator.
* :class:`UncertaintyMetric` -- accumulates, over a dataset (a :class:`torchmetrics.Metric`,
  summed across processes), how well an uncertainty map separates wrong from right pixels:
  AUROC and the error rate among the most uncertain pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from densediff.criteria.base import DatasetMetric, stack_steps

__all__ = ["step_change_uncertainty", "entropy_uncertainty", "UncertaintyMetric"]


# --------------------------------------------------------------------------------------------
# estimators


def step_change_uncertainty(step_labels: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-pixel share of sampling steps whose label differs from the previous step's label.

    The DDP estimator (§3.4 "Uncertainty Awareness"): with the labels ``y_0 .. y_{S-1}``
    predicted after each of the S sampling steps (in sampling order), the change count is
    ``#{s in 1..S-1 : y_s != y_{s-1}}`` and the uncertainty is that count divided by ``S - 1``.

    The normalisation is fixed (divide by the largest possible count) rather than a per-image
    min-max rescaling: values stay comparable across images (a per-image min-max would map an
    image whose pixels changed at most once to the same 0..1 range as one with pixels that
    flip at every step, and a completely stable image to 0/0), and 1 keeps its meaning "the
    label changed at every step". Values are the multiples ``k / (S - 1)``.

    Args:
        step_labels: S x B x H x W integer label maps (any trailing shape), or a sequence of S
            such maps.

    Returns:
        float32 tensor of the trailing shape (B x H x W), values in ``[0, 1]``; all zeros when
        S == 1 (a single step cannot change).
    """
    step_labels = stack_steps(step_labels, "step_labels")
    if step_labels.is_floating_point():
        raise TypeError("step_labels must be integer label maps")
    s = step_labels.shape[0]
    if s == 1:
        return torch.zeros(step_labels.shape[1:], dtype=torch.float32, device=step_labels.device)
    changes = (step_labels[1:] != step_labels[:-1]).sum(0)
    return changes.to(torch.float32) / (s - 1)


def entropy_uncertainty(probs: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Normalised Shannon entropy ``H(p) / log K`` of class probabilities, in ``[0, 1]``.

    An alternative to :func:`step_change_uncertainty` (DDP §3.4 "Uncertainty Awareness"), to
    be applied to the accumulated (step-averaged) probabilities: 0 for a one-hot distribution,
    1 for the uniform one.

    ``probs`` is renormalised along ``dim`` first (a no-op for a distribution; step-summed
    probabilities work too), negative values are clamped to 0 and ``0 log 0`` counts as 0.
    The result is computed in float32 (float64 for float64 input) and clamped to ``[0, 1]``
    against rounding.

    Args:
        probs: non-negative class probabilities, e.g. B x K x H x W.
        dim: the class dimension (size K).

    Returns:
        ``probs`` with ``dim`` removed (B x H x W); all zeros when K == 1.
    """
    if not probs.is_floating_point():
        raise TypeError("probs must be a floating-point tensor")
    p = probs if probs.dtype == torch.float64 else probs.to(torch.float32)
    k = p.shape[dim]
    if k == 1:
        return torch.zeros_like(p.select(dim, 0))
    p = p.clamp(min=0)
    p = p / p.sum(dim, keepdim=True).clamp(min=torch.finfo(p.dtype).tiny)
    h = -torch.xlogy(p, p).sum(dim)
    return (h / math.log(k)).clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------
# metric


class UncertaintyMetric(DatasetMetric):
    """Dataset-level quality of an uncertainty map as a detector of wrong pixels.

    DDP (§3.4 "Uncertainty Awareness", Fig. 3c) argues that the pixels whose label keeps
    changing during sampling are the wrong ones; this metric quantifies it. A
    :class:`torchmetrics.Metric` (see :mod:`densediff.criteria.base`): call :meth:`update` per
    batch, then ``compute()``; under ``torch.distributed`` ``compute`` sums the accumulators
    of all processes first (``reduce()`` does it explicitly).

    Accumulators (int64 states summed over processes, on the metric's device; ``.to(device)``
    moves them): two histograms of the uncertainty of the valid pixels over ``bins`` equal
    bins of ``[0, 1]``, one for wrong and one for right pixels.
    Value u goes into bin ``floor(u * bins)`` (values within ``1e-6`` bin widths below an edge
    count into the upper bin, which absorbs the float32 rounding of ``k / n``); 1.0 goes into
    the last bin. Memory and cost are independent of the number of pixels.

    Results (:meth:`compute`), in percent:

    * ``AUROC``: the probability that a random wrong pixel is more uncertain than a random
      right one, ties (same bin) counted as 1/2 -- the Mann-Whitney statistic, equal to the
      area under the ROC curve with ties as diagonal segments. NaN when there is no wrong or
      no right pixel. Discrete estimators whose distinct values are at least ``1 / bins``
      apart fall into distinct bins -- e.g. the step-change counts ``k / (S - 1)`` whenever
      ``S - 1 <= bins`` -- so for them the AUROC is exact; for continuous ones it is exact up
      to pairs sharing a bin (an error of at most the share of such pairs).
    * ``err_top{P}`` (``P = 100 * top_fraction``, default key ``err_top10``): the error rate
      among the ``top_fraction * N`` most uncertain of the N valid pixels, N not rounded. Bins
      are taken from the top; the bin straddling the cut contributes the needed share of its
      pixels with its error rate, i.e. pixels tied at the cut are split evenly. NaN when
      N == 0.
    * ``err_all``: the error rate over all valid pixels (NaN when N == 0).
    * ``pixels``: N (int).

    Args:
        bins: number of histogram bins over ``[0, 1]``.
        top_fraction: share of the most uncertain pixels for ``err_top{P}``, in ``(0, 1]``.
        device: where the accumulators live; inputs are moved there.
        **kwargs: :class:`torchmetrics.Metric`'s, see :class:`~densediff.criteria.base.DatasetMetric`.
    """

    def __init__(self, bins: int = 1000, top_fraction: float = 0.10,
                 device: torch.device | str = "cpu", **kwargs: Any):
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        if not 0.0 < top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
        super().__init__(**kwargs)
        self.bins = bins
        self.top_fraction = float(top_fraction)
        self.top_key = f"err_top{100 * self.top_fraction:.6g}"
        self.add_state("hist_wrong", torch.zeros(bins, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("hist_right", torch.zeros(bins, dtype=torch.int64), dist_reduce_fx="sum")
        self.to(device)

    # ---------------------------------------------------------------- accumulation

    def bin_index(self, uncertainty: torch.Tensor) -> torch.Tensor:
        """Histogram bin (int64) of each value in ``[0, 1]``, see the class doc."""
        x = uncertainty.to(self.device, torch.float64) * self.bins
        idx = torch.floor(x + 1e-6).to(torch.int64)
        return idx.clamp_(0, self.bins - 1)

    def update(self, uncertainty: torch.Tensor, wrong: torch.Tensor,
               valid: torch.Tensor | None = None) -> None:
        """Add a batch.

        Args:
            uncertainty: B x H x W values in ``[0, 1]`` (any shape; checked on valid pixels).
            wrong: bool, same shape: prediction != GT.
            valid: bool, same shape: pixels to count (GT not ignored); None: all.
        """
        self._check_not_synced()
        if valid is None:
            valid = torch.ones_like(wrong, dtype=torch.bool)
        if uncertainty.shape != wrong.shape or wrong.shape != valid.shape:
            raise ValueError(f"uncertainty {tuple(uncertainty.shape)}, wrong {tuple(wrong.shape)} "
                             f"and valid {tuple(valid.shape)} must have the same shape")
        if wrong.dtype != torch.bool or valid.dtype != torch.bool:
            raise TypeError("wrong and valid must be bool tensors")
        valid = valid.to(self.device)
        u = uncertainty.to(self.device)[valid]
        w = wrong.to(self.device)[valid]
        if u.numel() and not bool(((u >= 0) & (u <= 1)).all()):
            raise ValueError("uncertainty values must lie in [0, 1] (NaN is not allowed)")
        idx = self.bin_index(u)
        self.hist_wrong += torch.bincount(idx[w], minlength=self.bins)
        self.hist_right += torch.bincount(idx[~w], minlength=self.bins)

    # ---------------------------------------------------------------- results

    def compute(self) -> dict:
        """Results, see the class doc.

        Returns:
            dict with floats ``AUROC``, ``err_top{P}`` (see :attr:`top_key`), ``err_all`` (all
            in percent, NaN where undefined) and the int ``pixels``.
        """
        hw = self.hist_wrong.double().cpu()
        hr = self.hist_right.double().cpu()
        n_wrong, n_right = float(hw.sum()), float(hr.sum())
        n = n_wrong + n_right
        nan = float("nan")

        # Mann-Whitney: pairs (wrong, right) with the wrong pixel in a higher bin, + 1/2 ties.
        if n_wrong > 0 and n_right > 0:
            right_below = torch.cumsum(hr, 0) - hr
            auroc = 100 * float((hw * (right_below + 0.5 * hr)).sum()) / (n_wrong * n_right)
        else:
            auroc = nan

        if n > 0:
            err_top = 100 * self._top_errors(hw, hr, self.top_fraction * n) / (self.top_fraction * n)
            err_all = 100 * n_wrong / n
        else:
            err_top = err_all = nan
        return {"AUROC": auroc, self.top_key: err_top, "err_all": err_all, "pixels": int(n)}

    @staticmethod
    def _top_errors(hw: torch.Tensor, hr: torch.Tensor, need: float) -> float:
        """Expected wrong pixels among the ``need`` most uncertain (ties split evenly)."""
        tot = (hw + hr).flip(0)
        before = torch.cumsum(tot, 0) - tot  # pixels in the bins above
        take = torch.minimum((need - before).clamp(min=0), tot)
        share = torch.where(tot > 0, take / tot.clamp(min=1), torch.zeros_like(tot))
        return float((hw.flip(0) * share).sum())
