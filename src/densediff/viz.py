"""Pictures: uncertainty heatmaps and the accuracy-vs-steps curve of dynamic inference."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

__all__ = ["bev_color", "bev_image", "camera_mosaic", "depth_color", "heatmap", "plot_steps",
           "save_grid", "scaled_heatmap", "steps_table"]


def heatmap(values: np.ndarray, cmap: str = "inferno") -> np.ndarray:
    """``(H, W)`` values in [0, 1] -> ``(H, W, 3)`` uint8 colours (matplotlib colour map)."""
    from matplotlib import colormaps

    rgba = colormaps[cmap](np.clip(np.asarray(values, np.float32), 0, 1))
    return (rgba[..., :3] * 255 + 0.5).astype(np.uint8)


def scaled_heatmap(values: np.ndarray, cmap: str = "inferno") -> np.ndarray:
    """:func:`heatmap` of non-negative values scaled to their maximum (e.g. a depth
    uncertainty in metres); all zeros stay dark."""
    v = np.asarray(values, np.float32)
    return heatmap(v / max(float(v.max()), 1e-6), cmap)


def save_grid(rows: list[np.ndarray], path: str | os.PathLike, zoom: int = 2) -> None:
    """Stack equal-width H x W x 3 uint8 rows and save them enlarged ``zoom`` times
    (nearest neighbour)."""
    from PIL import Image

    grid = np.concatenate(rows, axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * zoom, grid.shape[0] * zoom),
                                 Image.NEAREST).save(path)


def depth_color(depth: np.ndarray, min_depth: float, max_depth: float,
                cmap: str = "magma") -> np.ndarray:
    """``(H, W)`` depths (metres) -> ``(H, W, 3)`` uint8 colours on a fixed scale: near is
    bright, ``max_depth`` and beyond dark, so pictures of several steps or images compare."""
    d = np.asarray(depth, np.float32)
    return heatmap(1 - (d - min_depth) / (max_depth - min_depth), cmap)


def bev_image(values: np.ndarray) -> np.ndarray:
    """An ego-frame grid ``[ix, iy, ...]`` (x forward, y left) as a picture: forward up, left on
    the left (rows = decreasing x, columns = decreasing y)."""
    return np.ascontiguousarray(np.asarray(values)[::-1, ::-1])


def bev_color(masks: np.ndarray, palette: np.ndarray, background: int = 255) -> np.ndarray:
    """K x X x Y {0, 1} masks -> an oriented (:func:`bev_image`) X x Y x 3 uint8 picture; classes
    are painted in order (later ones on top), empty cells get ``background``."""
    masks = np.asarray(masks) > 0
    out = np.full((*masks.shape[1:], 3), background, np.uint8)
    for k in range(masks.shape[0]):
        out[masks[k]] = palette[k]
    return bev_image(out)


def camera_mosaic(images: list[np.ndarray], cols: int = 3, gap: int = 2) -> np.ndarray:
    """Equal-size H x W x 3 camera images in rows of ``cols`` (six nuScenes cameras: front
    left, front, front right / back left, back, back right), white gaps."""
    h, w = images[0].shape[:2]
    rows = -(-len(images) // cols)
    out = np.full((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = img
    return out


def _bev_steps_table(results: Mapping[int, Mapping]) -> str:
    first = next(iter(results.values()))
    names = list(first["per_class"])
    kinds = list(first.get("uncertainty", {}))
    head = f"{'steps':>5} | " + " | ".join(f"{n[:9]:>9}" for n in names)
    head += f" | {'mIoU':>6} | {'mIoU@0.5':>8}"
    for k in kinds:
        head += f" | {'AUROC-' + k:>14}"
    rows = []
    for n, m in results.items():
        row = f"{n:>5} | " + " | ".join(f"{m['per_class'][c]:9.2f}" for c in names)
        row += f" | {m['mIoU']:6.2f} | {m['mIoU@0.50']:8.2f}"
        for k in kinds:
            row += f" | {m['uncertainty'][k]['AUROC']:14.2f}"
        rows.append(row)
    return "\n".join([head, "-" * len(head), *rows])


def _depth_steps_table(results: Mapping[int, Mapping]) -> str:
    kinds = list(dict.fromkeys(k for m in results.values() for k in m.get("uncertainty", {})))
    cols = ("d1", "abs_rel", "sq_rel", "rmse", "rmse_log", "silog")
    head = f"{'steps':>5} | " + " | ".join(f"{c:>8}" for c in cols)
    for k in kinds:
        head += f" | {'pearson-' + k:>14} | {'AUSE-' + k:>12}"
    rows = []
    for n, m in results.items():
        row = f"{n:>5} | " + " | ".join(f"{m[c]:8.4f}" for c in cols)
        for k in kinds:
            u = m.get("uncertainty", {}).get(k)
            row += (f" | {u['pearson']:14.3f} | {u['ause_abs_rel']:12.4f}" if u is not None
                    else f" | {'-':>14} | {'-':>12}")
        rows.append(row)
    return "\n".join([head, "-" * len(head), *rows])


def steps_table(results: Mapping[int, Mapping]) -> str:
    """Plain-text table of :func:`~densediff.engine.evaluate.evaluate_steps` results: one row
    per step count with mIoU, mBIoU, aAcc and, when present, the uncertainty AUROC and the
    error rate among the 10 % most uncertain pixels for each estimator. Depth results: d1,
    AbsRel, SqRel, RMSE, RMSE log, SILog and, per uncertainty map, its Pearson correlation
    with the AbsRel error and its AUSE (AbsRel). BEV results: each class's best-threshold IoU,
    mIoU, mIoU at 0.5 and the uncertainty AUROCs."""
    if "abs_rel" in next(iter(results.values())):
        return _depth_steps_table(results)
    if "mIoU@0.50" in next(iter(results.values())):
        return _bev_steps_table(results)
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
    """Save a PNG of mIoU and mBIoU (depth: AbsRel and RMSE log; BEV: mIoU and mIoU at 0.5)
    against the number of sampling steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [int(n) for n in results]
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
    depth = "abs_rel" in next(iter(results.values()))
    first = next(iter(results.values()))
    keys = (("abs_rel", "rmse_log") if depth else ("mIoU", "mIoU@0.50") if "mIoU@0.50" in first
            else ("mIoU", "mBIoU"))
    for key, style in zip(keys, ("o-", "s--")):
        ax.plot(steps, [results[n][key] for n in results], style, label=key)
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("error (lower is better)" if depth else "%")
    ax.set_xticks(steps)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
