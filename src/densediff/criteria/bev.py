"""BEV map segmentation: the loss and the metric (DDP paper §4.3, App. B.2).

- :func:`sigmoid_focal_loss`: the per-class sigmoid focal loss of BEVFusion's map head (Lin et
  al. 2017, gamma 2, alpha off), one mean per class.
- :class:`BEVIoUMetric`: per-class IoU at the thresholds 0.35, 0.40, ..., 0.65, counts summed
  over the dataset; reported as each class's best IoU over the thresholds and their mean
  (BEVFusion ``evaluate_map``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from densediff.criteria.base import DatasetMetric

__all__ = ["BEVIoUMetric", "IOU_THRESHOLDS", "format_bev_metrics", "sigmoid_focal_loss"]

IOU_THRESHOLDS = tuple(round(0.35 + 0.05 * i, 2) for i in range(7))
"""0.35, 0.40, ..., 0.65 (BEVFusion ``evaluate_map``)."""


def sigmoid_focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
                       alpha: float | None = None) -> torch.Tensor:
    """Per-class sigmoid focal loss, K values (each the mean over the batch and cells).

    ``FL = -alpha_t (1 - p_t)^gamma log(p_t)`` with ``p_t = p`` where the target is 1 and
    ``1 - p`` elsewhere (Lin et al. 2017, Eq. 5); ``alpha_t = alpha`` / ``1 - alpha``, or 1
    when ``alpha`` is None (BEVFusion's map head: alpha -1, i.e. off).

    Args:
        logits: B x K x X x Y.
        target: B x K x X x Y in {0, 1}.
    """
    target = target.to(logits.dtype)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = logits.sigmoid()
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    if alpha is not None:
        loss = loss * (alpha * target + (1 - alpha) * (1 - target))
    return loss.transpose(0, 1).flatten(1).mean(1)


class BEVIoUMetric(DatasetMetric):
    """IoU per class and threshold, accumulated over samples (a map cell is positive when its
    probability is at least the threshold).

    A :class:`torchmetrics.Metric` (see :mod:`densediff.criteria.base`): ``update`` takes
    B x K x X x Y probabilities and {0, 1} targets; the float64 K x T counts ``tp``, ``fp``,
    ``fn`` are states summed over processes (``compute`` does it, or ``reduce()`` explicitly);
    ``compute`` returns ``mIoU`` (the mean over classes of the best IoU over thresholds),
    ``mIoU@0.50``, ``per_class`` ({class: best IoU}), ``best_threshold`` and the full ``table``
    ({class: [IoU per threshold]}), all in percent. Further keyword arguments are
    :class:`torchmetrics.Metric`'s (see :class:`~densediff.criteria.base.DatasetMetric`).
    """

    higher_is_better = True

    def __init__(self, class_names: Sequence[str], thresholds: Sequence[float] = IOU_THRESHOLDS,
                 device: torch.device | str = "cpu", **kwargs: Any):
        super().__init__(**kwargs)
        self.class_names = list(class_names)
        self.thresholds = torch.tensor(list(thresholds), dtype=torch.float64)
        k, t = len(self.class_names), len(self.thresholds)
        for name in ("tp", "fp", "fn"):
            self.add_state(name, torch.zeros(k, t, dtype=torch.float64), dist_reduce_fx="sum")
        self.to(device)

    @torch.no_grad()
    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        self._check_not_synced()
        k = len(self.class_names)
        if probs.shape[1] != k or probs.shape != target.shape:
            raise ValueError(f"probs {tuple(probs.shape)} and target {tuple(target.shape)} must "
                             f"both be B x {k} x X x Y")
        p = probs.transpose(0, 1).flatten(1)  # K x N
        g = target.transpose(0, 1).flatten(1).bool()
        th = self.thresholds.to(p.device, p.dtype)  # compared in the probabilities' precision
        pred = p[:, None, :] >= th[None, :, None]  # K x T x N
        gt = g[:, None, :]
        self.tp += (pred & gt).sum(-1).to(self.tp)
        self.fp += (pred & ~gt).sum(-1).to(self.tp)
        self.fn += (~pred & gt).sum(-1).to(self.tp)

    def compute(self) -> dict:
        union = self.tp + self.fp + self.fn
        iou = torch.where(union > 0, self.tp / union.clamp(min=1), torch.nan) * 100  # K x T
        best = torch.nan_to_num(iou, nan=-1.0).max(1)
        half = int(torch.argmin((self.thresholds - 0.5).abs()))
        per_class = {n: float(iou[i, best.indices[i]]) for i, n in enumerate(self.class_names)}
        return {
            "mIoU": float(np.nanmean(list(per_class.values()))) if per_class else float("nan"),
            "mIoU@0.50": float(np.nanmean(iou[:, half].cpu().numpy())),
            "per_class": per_class,
            "best_threshold": {n: float(self.thresholds[best.indices[i]])
                               for i, n in enumerate(self.class_names)},
            "table": {n: [float(v) for v in iou[i]] for i, n in enumerate(self.class_names)},
            "thresholds": [float(t) for t in self.thresholds],
        }


def format_bev_metrics(metrics: dict) -> str:
    """A table of :meth:`BEVIoUMetric.compute`: per class its IoU at every threshold and the
    best one; then mIoU (mean of the best) and mIoU@0.50."""
    th = metrics["thresholds"]
    head = f"{'class':<14}" + "".join(f"{t:>7.2f}" for t in th) + f"{'best':>8}"
    rows = [head, "-" * len(head)]
    for name, ious in metrics["table"].items():
        rows.append(f"{name[:14]:<14}" + "".join(f"{v:7.2f}" for v in ious)
                    + f"{metrics['per_class'][name]:8.2f}")
    rows.append(f"mIoU (mean of best) {metrics['mIoU']:.2f}   mIoU@0.50 {metrics['mIoU@0.50']:.2f}")
    return "\n".join(rows)


def constant_iou(labels: Sequence[torch.Tensor], class_names: Sequence[str]) -> dict:
    """:meth:`BEVIoUMetric.compute` of the best constant prediction: every cell positive for
    every class (IoU = the class's share of cells; predicting nothing scores 0). The floor a
    BEV model must beat ("chance")."""
    metric = BEVIoUMetric(class_names, sync_on_compute=False)  # the given labels only
    for label in labels:
        metric.update(torch.ones(label.shape), label)
    return metric.compute()
