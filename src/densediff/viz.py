"""Pictures: uncertainty heatmaps, labelled picture grids (column titles, class legend, colour
bars) and the accuracy-vs-steps curve of dynamic inference."""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["ColorScale", "GridColumn", "GridKey", "Picture", "bev_color", "bev_image", "camera_mosaic",
           "colorize", "depth_color", "grid_figure", "heatmap", "nice_ceil", "overlay",
           "plot_steps", "save_labelled_grid", "scaled_heatmap", "side_by_side",
           "bev_steps_table", "depth_steps_table", "scalar_steps_table", "seg_steps_table"]


def colorize(mask: np.ndarray, palette: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Map class ids to RGB with ``palette`` (K x 3); ignore / out-of-range pixels are black."""
    out = np.zeros((*mask.shape, 3), np.uint8)
    valid = (mask >= 0) & (mask < len(palette)) & (mask != ignore_index)
    out[valid] = palette[mask[valid]]
    return out


def overlay(image: np.ndarray, color: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``image`` blended with ``color`` (both H x W x 3 uint8)."""
    return (image.astype(np.float32) * (1 - alpha) + color.astype(np.float32) * alpha
            ).astype(np.uint8)


def side_by_side(tiles: list[np.ndarray], gap: int = 4) -> np.ndarray:
    """Equal-height H x W x 3 uint8 tiles joined left to right with white gaps."""
    white = np.full((tiles[0].shape[0], gap, 3), 255, np.uint8)
    parts = [p for t in tiles for p in (t, white)][:-1]
    return np.concatenate(parts, axis=1)


def nice_ceil(x: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x a power of ten that is >= ``x`` (a colour-bar end)."""
    if x <= 0:
        return 1.0
    base = 10.0 ** math.floor(math.log10(x))
    return next(m * base for m in (1, 2, 2.5, 5, 10) if m * base >= x * (1 - 1e-9))


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


@dataclass(frozen=True)
class ColorScale:
    """How a picture's colours read: ``cmap`` spans ``vmin`` .. ``vmax`` (values beyond are
    clipped; ``extend="max"`` draws the colour bar's arrow for values at or above ``vmax``);
    ``label`` says what the value is and its unit, shown under the colour bar."""

    cmap: str
    vmin: float
    vmax: float
    label: str
    extend: str = "neither"

    def colorize(self, values: np.ndarray) -> np.ndarray:
        """``(H, W)`` values -> ``(H, W, 3)`` uint8 colours on this scale."""
        v = np.asarray(values, np.float32)
        return heatmap((v - self.vmin) / max(self.vmax - self.vmin, 1e-12), self.cmap)


Swatch = tuple[str, Sequence[int]]
"""A named colour: ``(name, (r, g, b))`` with 0..255 channels."""


@dataclass(frozen=True)
class Picture:
    """One picture and how to read it: a ``title``, the ``H x W x 3`` uint8 ``image``, and a
    colour bar (``scale``: what the colours mean, with the unit) and/or named colours
    (``legend``, e.g. the classes). What the result types give the web page
    (:mod:`densediff.app`) to show, whatever the task."""

    title: str
    image: np.ndarray
    scale: ColorScale | None = None
    legend: tuple[Swatch, ...] = ()


@dataclass(frozen=True)
class GridColumn:
    """One column of a labelled grid: its ``title`` and how to read its colours, a colour bar
    (``scale``) and/or named colour swatches (``swatches``), drawn under the column."""

    title: str
    scale: ColorScale | None = None
    swatches: tuple[Swatch, ...] = ()


@dataclass
class GridKey:
    """What a labelled grid shows, read back from the drawn figure: the title, the column
    titles, each column's colour-bar label ("" without one) and swatch names, and the labels of
    the class legend."""

    title: str
    columns: list[str]
    colorbars: list[str]
    swatches: list[list[str]]
    legend: list[str] = field(default_factory=list)
    legend_title: str = ""


_PT = 1 / 72  # inches per point
_TITLE_PT, _KEY_PT, _SUPTITLE_PT = 8.5, 7.0, 10.0


def _wrap(text: str, width_in: float, size_pt: float) -> str:
    """``text`` wrapped to lines that fit ``width_in`` inches at ``size_pt`` (DejaVu Sans is
    about 0.6 em per character on average)."""
    chars = max(6, int(width_in / (0.6 * size_pt * _PT)))
    return "\n".join(textwrap.fill(part, chars) for part in text.split("\n"))


def _lines(text: str) -> int:
    return text.count("\n") + 1 if text else 0


def _patch(color: Sequence[int]):
    from matplotlib.patches import Patch

    return Patch(facecolor=np.asarray(color, np.float32) / 255, edgecolor="0.45", linewidth=0.6)


_PAD, _GAP_X, _GAP_Y = 0.1, 0.1, 0.05  # inches: figure margin, between columns, between rows
_BAR_H, _TICK_H = 0.11, 0.17  # inches: a colour bar and its tick labels


@dataclass
class _GridLayout:
    """Where the parts of a :func:`grid_figure` go, in inches: column widths ``w_in`` and
    their left edges ``xs``, row heights ``h_in``, the figure size, the wrapped column titles,
    title and colour-bar labels with the heights of their bands, the heights of each column's
    colour bar and swatches, and the number of legend columns."""

    w_in: list[float]
    h_in: list[float]
    xs: list[float]
    fig_w: float
    fig_h: float
    titles: list[str]
    title_h: float
    sup: str
    sup_h: float
    cb_labels: list[str]
    cb_h: list[float]
    sw_h: list[float]
    ncol: int

    def box(self, x: float, top: float, w: float, h: float) -> list[float]:
        """[left, bottom, width, height] in figure fractions of a box given in inches from the
        top-left corner."""
        return [x / self.fig_w, 1 - (top + h) / self.fig_h, w / self.fig_w, h / self.fig_h]


def _grid_zoom(col_w: Sequence[float]) -> float:
    """Screen pixels per tile pixel: enough for the narrowest column to be 150 pixels wide
    (a whole number where that fits), within about 2000 pixels of width, at least 1."""
    zoom = max(1.0, 150 / min(col_w))
    zoom = float(math.ceil(zoom)) if math.ceil(zoom) * sum(col_w) <= 2000 else zoom
    return max(1.0, min(zoom, 2000 / sum(col_w)))


def _grid_layout(rows: Sequence[Sequence[np.ndarray]], columns: Sequence[GridColumn],
                 legend: Sequence[Swatch], legend_title: str, title: str, zoom: float | None,
                 dpi: int) -> _GridLayout:
    """The :class:`_GridLayout` of a :func:`grid_figure` with these arguments."""
    row_h = [max(t.shape[0] for t in r) for r in rows]
    col_w = [t.shape[1] * row_h[0] / t.shape[0] for t in rows[0]]  # tile pixels at row height
    zoom = _grid_zoom(col_w) if zoom is None else zoom
    w_in = [w * zoom / dpi for w in col_w]
    h_in = [h * zoom / dpi for h in row_h]
    fig_w = 2 * _PAD + sum(w_in) + _GAP_X * (len(columns) - 1)
    titles = [_wrap(c.title, w, _TITLE_PT) for c, w in zip(columns, w_in)]
    title_h = max(_lines(t) for t in titles) * _TITLE_PT * 1.3 * _PT + 0.08
    sup = _wrap(title, fig_w - 2 * _PAD, _SUPTITLE_PT) if title else ""
    sup_h = _lines(sup) * _SUPTITLE_PT * 1.35 * _PT + (0.06 if sup else 0)
    # the key band under the grid: per column a colour bar (bar, ticks, label) then swatches
    cb_labels = [_wrap(c.scale.label, w, _KEY_PT) if c.scale else "" for c, w in zip(columns, w_in)]
    cb_h = [_BAR_H + _TICK_H + _lines(lab) * _KEY_PT * 1.3 * _PT + 0.05 if c.scale else 0.0
            for c, lab in zip(columns, cb_labels)]
    sw_h = [len(c.swatches) * _KEY_PT * 1.9 * _PT + 0.04 if c.swatches else 0.0 for c in columns]
    key_h = max(a + b for a, b in zip(cb_h, sw_h))
    key_h = key_h + 0.1 if key_h else 0.0
    # the legend band: entries in as many columns as fit the width
    leg_h, ncol = 0.0, 1
    if legend:
        entry_in = max(len(n) for n, _ in legend) * 0.6 * 8 * _PT + 0.45
        ncol = max(1, min(len(legend), int((fig_w - 2 * _PAD) / entry_in)))
        leg_h = _legend_height(legend, ncol, legend_title, fig_w, dpi) + 0.1
    fig_h = (2 * _PAD + sup_h + title_h + sum(h_in) + _GAP_Y * (len(rows) - 1) + key_h + leg_h)
    xs = [_PAD + sum(w_in[:c]) + _GAP_X * c for c in range(len(columns))]
    return _GridLayout(w_in, h_in, xs, fig_w, fig_h, titles, title_h, sup, sup_h, cb_labels,
                       cb_h, sw_h, ncol)


def _draw_tiles(fig, lay: _GridLayout, rows: Sequence[Sequence[np.ndarray]]) -> float:
    """The tiles of ``rows`` (axes labelled ``tile:<row>:<column>``, the first row's titled);
    returns the top of the key band in inches."""
    top = _PAD + lay.sup_h + lay.title_h
    for r, (row, h) in enumerate(zip(rows, lay.h_in)):
        for c, tile in enumerate(row):
            ax = fig.add_axes(lay.box(lay.xs[c], top, lay.w_in[c], h))
            ax.imshow(tile, interpolation="nearest", aspect="auto")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_label(f"tile:{r}:{c}")
            if r == 0:
                ax.set_title(lay.titles[c], fontsize=_TITLE_PT, pad=4)
        top += h + _GAP_Y
    return top + 0.1 - _GAP_Y


def _draw_colorbar(fig, lay: _GridLayout, c: int, s: ColorScale, y: float) -> None:
    """Column ``c``'s colour bar of ``s`` (axes labelled ``colorbar:<c>``), its top at ``y``
    inches, with few short tick labels and the scale's label under it."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    w = lay.w_in[c]
    cax = fig.add_axes(lay.box(lay.xs[c] + 0.06 * w, y, 0.88 * w, _BAR_H))
    cax.set_label(f"colorbar:{c}")
    cb = fig.colorbar(ScalarMappable(Normalize(s.vmin, s.vmax), s.cmap), cax=cax,
                      orientation="horizontal", extend=s.extend)
    # few, short tick labels (%g: 0.0005, not 0.00050) so that they never overlap
    cax.xaxis.set_major_locator(MaxNLocator(nbins=max(2, min(5, int(0.88 * w / 0.55)))))
    cax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    cax.tick_params(labelsize=_KEY_PT, length=2, pad=1)
    cb.set_label(lay.cb_labels[c], fontsize=_KEY_PT, labelpad=2)


def _draw_swatches(fig, lay: _GridLayout, c: int, swatches: Sequence[Swatch], y: float) -> None:
    """Column ``c``'s named colours (axes labelled ``swatches:<c>``), their top at ``y``."""
    kax = fig.add_axes(lay.box(lay.xs[c], y, lay.w_in[c], lay.sw_h[c]))
    kax.set_axis_off()
    kax.set_label(f"swatches:{c}")
    kax.legend([_patch(rgb) for _, rgb in swatches], [n for n, _ in swatches],
               loc="upper center", fontsize=_KEY_PT, frameon=False, borderaxespad=0,
               handlelength=1.4, handleheight=0.9, labelspacing=0.3)


def grid_figure(rows: Sequence[Sequence[np.ndarray]], columns: Sequence[GridColumn],
                legend: Sequence[Swatch] = (), legend_title: str = "", title: str = "",
                zoom: float | None = None, dpi: int = 100):
    """A matplotlib Figure of a picture grid a reader can read unaided: every column titled,
    a colour bar (with its label: what, unit, what the scale means) and/or swatches under the
    columns that have them, and a legend of named colours (``legend``, e.g. the classes) under
    the grid.

    ``rows``: one list of ``H x W x 3`` uint8 tiles per row, one tile per column; the tiles of
    a row are shown at the row's largest height (aspect kept), column widths follow the first
    row. ``zoom``: screen pixels per tile pixel (default: enough for readable titles, within
    about 2000 pixels of width). Uses the object-oriented API only (no pyplot state)."""
    from matplotlib.figure import Figure

    if not rows or any(len(r) != len(columns) for r in rows):
        raise ValueError(f"every row needs one tile per column ({len(columns)} columns)")
    lay = _grid_layout(rows, columns, legend, legend_title, title, zoom, dpi)
    fig = Figure(figsize=(lay.fig_w, lay.fig_h), dpi=dpi)
    if lay.sup:
        fig.suptitle(lay.sup, y=1 - _PAD / lay.fig_h, va="top", fontsize=_SUPTITLE_PT,
                     weight="bold")
    top = _draw_tiles(fig, lay, rows)
    for c, col in enumerate(columns):
        y = top
        if col.scale:
            _draw_colorbar(fig, lay, c, col.scale, y)
            y += lay.cb_h[c]
        if col.swatches:
            _draw_swatches(fig, lay, c, col.swatches, y)
    if legend:
        _draw_legend(fig, legend, lay.ncol, legend_title, (0.5, _PAD / lay.fig_h))
    return fig


def _draw_legend(fig, legend: Sequence[Swatch], ncol: int, title: str, anchor):
    """The named-colour legend of :func:`grid_figure`, its bottom centre at ``anchor``."""
    return fig.legend([_patch(rgb) for _, rgb in legend], [n for n, _ in legend],
                      loc="lower center", bbox_to_anchor=anchor, ncol=ncol, fontsize=8,
                      title=title or None, title_fontsize=8, frameon=False, handlelength=1.6,
                      handleheight=1.0, columnspacing=1.2, borderaxespad=0)


def _legend_height(legend: Sequence[Swatch], ncol: int, title: str, width: float,
                   dpi: int) -> float:
    """Height in inches of that legend, measured by drawing it once on a scratch figure (an
    estimate per row left a gap above long legends, e.g. ADE20K's 150 classes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scratch = Figure(figsize=(width, 1.0), dpi=dpi)
    canvas = FigureCanvasAgg(scratch)
    leg = _draw_legend(scratch, legend, ncol, title, (0.5, 0.0))
    return leg.get_window_extent(canvas.get_renderer()).height / dpi


def grid_key(fig) -> GridKey:
    """The :class:`GridKey` of a :func:`grid_figure`: what is actually drawn on it."""
    by_label = {ax.get_label(): ax for ax in fig.axes}
    n = sum(1 for k in by_label if k.startswith("tile:0:"))
    one = lambda t: " ".join(t.split())  # titles and labels are wrapped onto several lines
    cols = [one(by_label[f"tile:0:{c}"].get_title()) for c in range(n)]
    bars = [one(by_label[f"colorbar:{c}"].get_xlabel()) if f"colorbar:{c}" in by_label else ""
            for c in range(n)]
    sw = [[t.get_text() for t in by_label[f"swatches:{c}"].get_legend().get_texts()]
          if f"swatches:{c}" in by_label else [] for c in range(n)]
    leg = fig.legends[0] if fig.legends else None
    sup = fig.get_suptitle()
    return GridKey(title=one(sup), columns=cols,
                   colorbars=bars, swatches=sw,
                   legend=[t.get_text() for t in leg.get_texts()] if leg else [],
                   legend_title=leg.get_title().get_text() if leg else "")


def save_labelled_grid(rows: Sequence[Sequence[np.ndarray]], columns: Sequence[GridColumn],
                       path: str | os.PathLike, legend: Sequence[Swatch] = (),
                       legend_title: str = "", title: str = "",
                       zoom: float | None = None) -> GridKey:
    """Save :func:`grid_figure` as a PNG at ``path``; returns its :class:`GridKey`."""
    fig = grid_figure(rows, columns, legend, legend_title, title, zoom)
    key = grid_key(fig)
    fig.savefig(path, facecolor="white")
    return key


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


def bev_steps_table(results: Mapping[int, Mapping]) -> str:
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


def depth_steps_table(results: Mapping[int, Mapping]) -> str:
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


def scalar_steps_table(results: Mapping[int, Mapping]) -> str:
    """Plain-text table of :func:`~densediff.engine.evaluate.evaluate_steps` results: one row
    per step count with every number-valued metric."""
    first = next(iter(results.values()))
    cols = [k for k, v in first.items() if isinstance(v, (int, float))]
    head = f"{'steps':>5} | " + " | ".join(f"{c:>10}" for c in cols)
    rows = [f"{n:>5} | " + " | ".join(f"{m[c]:10.4f}" for c in cols) for n, m in results.items()]
    return "\n".join([head, "-" * len(head), *rows])


def seg_steps_table(results: Mapping[int, Mapping]) -> str:
    """Plain-text table of segmentation :func:`~densediff.engine.evaluate.evaluate_steps`
    results: one row per step count with mIoU, mBIoU, aAcc and, when present, the uncertainty
    AUROC and the error rate among the 10 % most uncertain pixels for each estimator."""
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
               keys: Sequence[str], ylabel: str = "%", title: str | None = None) -> None:
    """Save a PNG of the metrics ``keys`` (each a line; the y axis labelled ``ylabel``)
    against the number of sampling steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [int(n) for n in results]
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
    for key, style in zip(keys, ("o-", "s--", "^:", "d-.")):
        ax.plot(steps, [results[n][key] for n in results], style, label=key)
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(ylabel)
    ax.set_xticks(steps)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
