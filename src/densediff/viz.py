"""Pictures: uncertainty heatmaps and the accuracy-vs-steps curve of dynamic inference."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

__all__ = ["heatmap", "plot_steps", "steps_table"]


def heatmap(values: np.ndarray, cmap: str = "inferno") -> np.ndarray:
    """``(H, W)`` values in [0, 1] -> ``(H, W, 3)`` uint8 colours (matplotlib colour map)."""
    from matplotlib import colormaps

    rgba = colormaps[cmap](np.clip(np.asarray(values, np.float32), 0, 1))
    return (rgba[..., :3] * 255 + 0.5).astype(np.uint8)


def steps_table(results: Mapping[int, Mapping]) -> str:
    """Plain-text table of :func:`~densediff.engine.evaluate.evaluate_steps` results: one row
    per step count with mIoU, mBIoU, aAcc and, when present, the uncertainty AUROC and the
    error rate among the 10 % most uncertain pixels for each estimator."""
    first = next(iter(results.values()))
    kinds = list(first.get("uncertainty", {}))
    head = f"{'steps':>5} | {'mIoU':>6} | {'mBIoU':>6} | {'aAcc':>6}"
    for k in kinds:
        head += f" | {'AUROC-' + k:>14} | {'err@10%-' + k:>16}"
    rows = []
    for n, m in results.items():
        row = f"{n:>5} | {m['mIoU']:6.2f} | {m['mBIoU']:6.2f} | {m['aAcc']:6.2f}"
        for k in kinds:
            u = m["uncertainty"][k]
            row += f" | {u['AUROC']:14.2f} | {u['err_top10']:16.2f}"
        rows.append(row)
    return "\n".join([head, "-" * len(head), *rows])


def plot_steps(results: Mapping[int, Mapping], path: str | os.PathLike,
               title: str | None = None) -> None:
    """Save a PNG of mIoU and mBIoU against the number of sampling steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [int(n) for n in results]
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
    for key, style in (("mIoU", "o-"), ("mBIoU", "s--")):
        ax.plot(steps, [results[n][key] for n in results], style, label=key)
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("%")
    ax.set_xticks(steps)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
