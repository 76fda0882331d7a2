"""Semantic segmentation: the training loss and the evaluation metrics.

Semantics follow MMSegmentation (mmseg 0.x ``CrossEntropyLoss`` and ``mean_iou``), plus the
Boundary IoU of Cheng et al. 2021 ("Boundary IoU: Improving Object-Centric Image Segmentation
Evaluation", CVPR 2021), accumulated per class over the dataset as DDPS reports it (mBIoU).

* :func:`ce_loss` -- pixel-wise cross-entropy with an ignore label.
* :class:`SegMetric` -- accumulates a confusion matrix and per-class boundary counts over a
  dataset (a :class:`torchmetrics.Metric`, summed across processes) and reports aAcc, mIoU,
  mAcc and mBIoU.
* :func:`format_metrics` -- the results as a plain-text table.
* :func:`boundary_width` / :func:`label_boundary` -- the Boundary-IoU band, exposed for tests
  and visualisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from densediff.criteria.base import DatasetMetric
from densediff.errors import DataError

__all__ = ["ce_loss", "boundary_width", "label_boundary", "SegMetric", "format_metrics"]


# --------------------------------------------------------------------------------------------
# loss


def ce_loss(logits: torch.Tensor, label: torch.Tensor, ignore_index: int = 255,
            avg_non_ignore: bool = False) -> torch.Tensor:
    """Pixel-wise cross-entropy with an ignore label (mmseg ``CrossEntropyLoss`` semantics).

    The logits are upsampled bilinearly (``align_corners=False``) to the label size first.

    Args:
        logits: B x K x h x w class scores (any h, w).
        label: B x H x W int64 class ids in ``[0, K)`` or ``ignore_index``.
        ignore_index: label value that contributes no loss.
        avg_non_ignore: False (mmseg default): the summed loss is divided by the number of ALL
            pixels, ignored ones counting as zero loss. True: divided by the number of
            non-ignored pixels (0 when there are none, instead of NaN).

    Returns:
        Scalar loss tensor.
    """
    if logits.shape[-2:] != label.shape[-2:]:
        logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear",
                               align_corners=False)
    loss = F.cross_entropy(logits, label, ignore_index=ignore_index, reduction="sum")
    if avg_non_ignore:
        return loss / (label != ignore_index).sum().clamp(min=1)
    return loss / label.numel()


# --------------------------------------------------------------------------------------------
# boundary band (Cheng et al. 2021)


def boundary_width(size: tuple[int, int], dilation_ratio: float) -> int:
    """Band width d in pixels: ``round(dilation_ratio * image diagonal)``, at least 1.

    Same rounding as the official ``boundary_iou`` code (Python ``round``, i.e. half to even).
    """
    h, w = size
    return max(1, int(round(dilation_ratio * math.sqrt(h * h + w * w))))


def _max_filter(x: torch.Tensor, d: int) -> torch.Tensor:
    """Max over a (2d+1) x (2d+1) square window (separable), no padding: shrinks H, W by 2d."""
    k = 2 * d + 1
    return F.max_pool2d(F.max_pool2d(x, (1, k), stride=1), (k, 1), stride=1)


def class_ids(scores: torch.Tensor) -> torch.Tensor:
    """Per-pixel class ids of B x K x H x W scores: the index of the first maximum over K.

    The same result as ``scores.argmax(1)`` (first maximum on ties), but ``max(1).indices``
    is several times faster on CPU for full-resolution maps (``argmax`` over a strided dim is
    slow; benchmarks/class_ids_bench.py, RESULTS §12).
    """
    return scores.max(1).indices


def label_boundary(labels: torch.Tensor, d: int) -> torch.Tensor:
    """Boundary-IoU band of every class at once.

    For the binary mask ``M_c = (labels == c)`` of any class c, Cheng et al. define the
    boundary as ``M_c`` minus its erosion by a (2d+1) x (2d+1) square, with everything outside
    the image counted as background (the official code pads the mask with one row/column of
    zeros and applies ``cv2.erode`` with a 3x3 kernel d times; ``cv2.erode`` treats the area
    beyond the padded image as neutral, so the zero pad spreads inwards one pixel per
    iteration: the outermost d rows/columns of a mask touching the image border are boundary,
    exactly like d pixels next to a hole). The d-fold 3x3 erosion equals one erosion by the
    (2d+1) square, and a pixel of class c survives it iff its (2d+1) x (2d+1) window lies
    inside the image and holds only class c. So a pixel is in the band of its own class iff
    that window is not constant once the outside is filled with a value no class has: one max
    and one min filter of the padded label map give the bands of all classes at once (cost
    independent of K). A pixel of class c can only be in the band of class c, so the band of
    class c is ``band & (labels == c)``.

    Any value different from c (including an ignore label) is background for class c.

    Args:
        labels: B x H x W integer label map.
        d: band width in pixels (>= 1), see :func:`boundary_width`.

    Returns:
        B x H x W bool tensor, True on boundary pixels.
    """
    if d < 1:
        raise ValueError(f"boundary width must be >= 1, got {d}")
    # float32 holds integers exactly up to 2**24, far beyond any class id / ignore label.
    x = F.pad(labels[:, None].float(), (d, d, d, d), value=-1.0)
    hi = _max_filter(x, d)
    lo = -_max_filter(-x, d)
    return (hi != lo)[:, 0]


# --------------------------------------------------------------------------------------------
# metric


class SegMetric(DatasetMetric):
    """Dataset-level segmentation metrics: aAcc, mIoU, mAcc (mmseg) and mBIoU (Cheng et al.).

    A :class:`torchmetrics.Metric` (see :mod:`densediff.criteria.base`): call :meth:`update` per
    batch, then ``compute()``; under ``torch.distributed`` ``compute`` sums the accumulators of
    all processes first (``reduce()`` does it explicitly).

    Accumulators (int64 states summed over processes, on the metric's device; ``.to(device)``
    moves them): a K x K confusion matrix ``confusion[gt, pred]`` over the non-ignored pixels,
    and per class the boundary intersection and union counts.

    Definitions (all in percent; ``nanmean`` over classes, as mmseg does):

    * IoU_c = TP / (TP + FP + FN); NaN when class c is in neither GT nor prediction.
    * Acc_c = TP / (TP + FN); NaN when class c has no GT pixel (also when it is predicted).
    * aAcc = sum TP / number of non-ignored pixels.
    * BIoU_c = |G_c ∩ P_c| / |G_c ∪ P_c| with G_c, P_c the boundary bands (width
      ``boundary_width(image size, boundary_dilation)``, see :func:`label_boundary`) of the
      GT and predicted masks of class c, counts summed over the dataset; NaN when both are
      empty. The bands are computed on the full image (ignore pixels are background for every
      class, as in the DDPS code), then pixels whose GT is ``ignore_index`` are left out of both
      counts (DDPS counts predicted boundary pixels lying on ignore pixels in the union).

    Args:
        num_classes: K.
        ignore_index: GT value excluded from all statistics.
        boundary_dilation: band width as a share of the image diagonal (Cheng et al.: 0.02).
        device: where the accumulators live; inputs are moved there.
        boundary: False skips the boundary bands (mBIoU and BIoU are then NaN); for callers
            that only read mIoU, e.g. the diagnostics' many single-call scores.
        **kwargs: :class:`torchmetrics.Metric`'s, see :class:`~densediff.criteria.base.DatasetMetric`.
    """

    higher_is_better = True

    def __init__(self, num_classes: int, ignore_index: int = 255,
                 boundary_dilation: float = 0.02, device: torch.device | str = "cpu",
                 boundary: bool = True, **kwargs: Any):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.boundary_dilation = boundary_dilation
        self.boundary = boundary
        k = num_classes
        self.add_state("confusion", torch.zeros(k, k, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("boundary_inter", torch.zeros(k, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("boundary_union", torch.zeros(k, dtype=torch.int64), dist_reduce_fx="sum")
        self.to(device)

    # ---------------------------------------------------------------- accumulation

    def update(self, pred: torch.Tensor | Sequence[torch.Tensor],
               label: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Add a batch.

        Args:
            pred: B x H x W predicted class ids (int), or a list of H_i x W_i maps.
            label: B x H x W GT class ids / ``ignore_index``, same shape(s) as ``pred``.

        Each map must be at its true image size (the boundary width and the border band depend
        on it): crop away batch padding before calling, or pass lists of per-image maps.
        """
        self._check_not_synced()
        if isinstance(pred, torch.Tensor) != isinstance(label, torch.Tensor):
            raise TypeError("pred and label must both be tensors or both be sequences")
        if isinstance(pred, torch.Tensor):
            if pred.dim() == 2:
                pred, label = pred[None], label[None]
            self._update_batch(pred, label)
            return
        if len(pred) != len(label):
            raise ValueError(f"got {len(pred)} predictions for {len(label)} labels")
        for p, g in zip(pred, label):
            self._update_batch(p[None], g[None])

    def _update_batch(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        if pred.shape != label.shape or pred.dim() != 3:
            raise ValueError(f"pred {tuple(pred.shape)} and label {tuple(label.shape)} must "
                             "have the same B x H x W shape")
        if pred.is_floating_point() or label.is_floating_point():
            raise TypeError("pred and label must be integer class maps")
        k = self.num_classes
        pred = pred.to(self.device, torch.int64)
        label = label.to(self.device, torch.int64)
        valid = label != self.ignore_index
        self._check_range(pred, label, valid)

        gt_v, pr_v = label[valid], pred[valid]
        self.confusion += torch.bincount(gt_v * k + pr_v, minlength=k * k).view(k, k)
        if not self.boundary:
            return

        d = boundary_width(tuple(label.shape[-2:]), self.boundary_dilation)
        gt_band = label_boundary(label, d) & valid
        pr_band = label_boundary(pred, d) & valid
        both = gt_band & pr_band & (label == pred)
        inter = torch.bincount(label[both], minlength=k)
        self.boundary_inter += inter
        self.boundary_union += (torch.bincount(label[gt_band], minlength=k)
                                + torch.bincount(pred[pr_band], minlength=k) - inter)

    def _check_range(self, pred: torch.Tensor, label: torch.Tensor,
                     valid: torch.Tensor) -> None:
        k = self.num_classes
        if pred.numel() and (pred.min() < 0 or pred.max() >= k):
            raise ValueError(f"prediction has class ids outside 0..{k - 1}")
        bad = valid & ((label < 0) | (label >= k))
        if bad.any():
            v = int(label[bad][0])
            raise DataError(f"label value {v} is outside 0..{k - 1} and is not the "
                            f"ignore_index {self.ignore_index}")

    # ---------------------------------------------------------------- results

    def compute(self) -> dict:
        """Metrics in percent.

        Returns:
            dict with floats ``aAcc``, ``mIoU``, ``mAcc``, ``mBIoU`` and ``per_class``: a list
            of K dicts ``{"IoU", "Acc", "BIoU"}`` (NaN where undefined, see the class doc).
        """
        cm = self.confusion.double().cpu()
        tp = cm.diag()
        n_gt = cm.sum(1)
        n_pred = cm.sum(0)
        iou = 100 * tp / (n_gt + n_pred - tp)  # 0/0 -> NaN
        acc = 100 * tp / n_gt
        # without boundary bands both counts stay 0: 0 / 0 = NaN
        biou = 100 * self.boundary_inter.double().cpu() / self.boundary_union.double().cpu()
        return {
            "aAcc": float(100 * tp.sum() / cm.sum()),
            "mIoU": _nanmean(iou),
            "mAcc": _nanmean(acc),
            "mBIoU": _nanmean(biou),
            "per_class": [{"IoU": float(a), "Acc": float(b), "BIoU": float(c)}
                          for a, b, c in zip(iou, acc, biou)],
        }

    def format_table(self, class_names: Sequence[str] | None = None) -> str:
        """Per-class table of :meth:`compute`'s results, see :func:`format_metrics`."""
        return format_metrics(self.compute(), class_names)


def format_metrics(metrics: dict, class_names: Sequence[str] | None = None) -> str:
    """Plain-text table of :meth:`SegMetric.compute` results: one row per class (IoU / Acc /
    BIoU, NaN shown as ``nan``), then the summary line ``aAcc .. mIoU .. mAcc .. mBIoU ..``.

    Args:
        metrics: the dict returned by :meth:`SegMetric.compute` (also after a JSON round trip).
        class_names: one name per class; None: class indices.
    """
    per_class = metrics["per_class"]
    if class_names is None:
        class_names = [str(i) for i in range(len(per_class))]
    if len(class_names) != len(per_class):
        raise ValueError(f"got {len(class_names)} class names for {len(per_class)} classes")
    width = max([5] + [len(n) for n in class_names])
    head = f"{'Class':<{width}} | {'IoU':>6} | {'Acc':>6} | {'BIoU':>6}"
    rule = "-" * len(head)
    rows = [f"{name:<{width}} | {pc['IoU']:6.2f} | {pc['Acc']:6.2f} | {pc['BIoU']:6.2f}"
            for name, pc in zip(class_names, per_class)]
    summary = "  ".join(f"{key} {metrics[key]:.2f}" for key in ("aAcc", "mIoU", "mAcc", "mBIoU"))
    return "\n".join([head, rule, *rows, rule, summary])


def _nanmean(x: torch.Tensor) -> float:
    """Mean over the non-NaN entries; NaN if there are none."""
    x = x[~x.isnan()]
    return float(x.mean()) if x.numel() else float("nan")
