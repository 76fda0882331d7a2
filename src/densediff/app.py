"""``densediff app``: a local web page (Gradio) around a :class:`~densediff.api.Predictor`.

The page takes an uploaded image (or one of the examples; BEV models: a sample of the
checkpoint's dataset, picked by split and index) and shows what the result type draws for
its task (:class:`~densediff.viz.Picture`: ``input_view``, ``prediction_view`` with its class
legend or colour bar, ``uncertainty_view``, ``step_view`` for the sampling-step slider), the
summary JSON, and the files ``densediff predict`` writes as downloads. Nothing here branches on
a task: the pictures, their keys and the files come from the result object, and the input
controls from ``Pipeline.image_input``.

Gradio is optional (``pip install "densediff[app]"``); this module imports it only when a page
is built. Bad input (a file that is no image, one above the decoded-pixel limit, a step count
the model does not take) is one line on the page, never a stack trace; unexpected failures are
logged to the server's stderr and named in one line.
"""

from __future__ import annotations

import html
import json
import os
import sys
import tempfile
import traceback
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from densediff.errors import UserError, one_line, terminal_line

__all__ = ["App", "build_app", "check_host_port", "key_html", "list_examples", "require_gradio",
           "run_predict"]

INSTALL_HINT = 'pip install "densediff[app]"'
MAX_EXAMPLES = 50
"""Example images shown at most (the first, by name)."""
STEPS_CAP = 50
"""The steps slider ends here (or at the model's default, if higher; the library's limit is
1000 steps, minutes per image for the paper's models on a CPU)."""
STARTS_CAP = 16
"""The random-starts slider ends here (or at the model's own ``randsteps``, if higher)."""
PICTURE_HEIGHT = 240
"""Height of the pictures on the page (CSS pixels; small maps are scaled up to fill it)."""
MAX_UPLOAD = "200mb"
"""Gradio refuses larger uploads; the decoded-pixel limit (``DENSEDIFF_MAX_IMAGE_PIXELS``) is
checked from the image header before decoding."""


def require_gradio():
    """The ``gradio`` module; UserError naming the extra to install when it is absent."""
    try:
        import gradio
    except ImportError:
        raise UserError(f"app: the web page needs Gradio: {INSTALL_HINT}") from None
    return gradio


def check_host_port(host: str, port: int | None) -> None:
    """UserError for an empty host name or a port outside 1 .. 65535 (None: Gradio picks a
    free one from 7860)."""
    if not host or any(c.isspace() for c in host):
        raise UserError(f"--host: expected a host name or address, got {host!r}")
    if port is not None and not 1 <= port <= 65535:
        raise UserError(f"--port: must be between 1 and 65535, got {port}")


def list_examples(folder: str | Path) -> list[Path]:
    """The image files directly in ``folder`` (sorted, at most :data:`MAX_EXAMPLES`), each
    header read (a corrupt or oversized image is one line naming it); UserError when the folder
    is missing or holds no images."""
    from densediff.data.io import IMAGE_EXTENSIONS, image_size

    path = Path(folder)
    if not path.is_dir():
        from densediff.utils.checks import path_kind

        kind = path_kind(path)
        raise UserError(f"--examples {folder}: " + ("no such folder" if kind == "missing"
                                                     else f"is {kind}, not a folder"))
    try:
        files = sorted(p for p in path.iterdir()
                       if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    except OSError as e:
        raise UserError(f"--examples {folder}: cannot list the folder ({e.strerror or e})"
                        ) from None
    if not files:
        raise UserError(f"--examples {folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in "
                        "the folder")
    files = files[:MAX_EXAMPLES]
    for f in files:
        image_size(f)  # header only: one line naming a bad file
    return files


# ------------------------------------------------------------------------------------------
# pictures and their keys (legend, colour bar) as HTML


def key_html(picture) -> str:
    """The key of a :class:`~densediff.viz.Picture` as HTML: its colour bar (gradient, the
    ends and middle as ticks, the label with the unit) and/or its legend (a swatch and the name
    of each colour). Empty when the picture has neither."""
    parts = []
    scale = picture.scale
    if scale is not None:
        from densediff.viz import heatmap

        ramp = heatmap(np.linspace(0, 1, 16), scale.cmap)
        stops = ", ".join(f"rgb({r},{g},{b})" for r, g, b in ramp.tolist())
        mid = (scale.vmin + scale.vmax) / 2
        ticks = "".join(f"<span>{v:g}</span>" for v in (scale.vmin, mid, scale.vmax))
        parts.append(
            f'<div class="dd-colorbar"><div class="dd-ramp" style="background: '
            f'linear-gradient(to right, {stops})"></div><div class="dd-ticks">{ticks}</div>'
            f'<div class="dd-label">{html.escape(scale.label)}</div></div>')
    if picture.legend:
        items = "".join(
            f'<span class="dd-item"><span class="dd-swatch" style="background: '
            f'rgb({int(c[0])},{int(c[1])},{int(c[2])})"></span>{html.escape(str(name))}</span>'
            for name, c in picture.legend)
        parts.append(f'<div class="dd-legend">{items}</div>')
    return "".join(parts)


CSS = """
.dd-colorbar { margin: 4px 8px; font-size: 12px; }
.dd-ramp { height: 12px; border: 1px solid #888; }
.dd-ticks { display: flex; justify-content: space-between; }
.dd-label { text-align: center; color: #444; }
.dd-legend { display: flex; flex-wrap: wrap; gap: 4px 12px; margin: 4px 8px; font-size: 12px; }
.dd-item { display: inline-flex; align-items: center; gap: 4px; }
.dd-swatch { display: inline-block; width: 14px; height: 14px; border: 1px solid #777; }
/* small maps fill their box, pixels kept sharp (the picture itself is sent unscaled) */
.dd-picture img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
"""


# ------------------------------------------------------------------------------------------
# one prediction, independent of Gradio


@dataclass
class Shown:
    """What the page shows for one prediction: the result, its pictures, the summary and the
    files to download."""

    pred: Any
    input: Any
    prediction: Any
    uncertainty: Any
    step: Any
    num_steps: int
    summary: dict
    files: list[str] = field(default_factory=list)


def _stem(name: str) -> str:
    stem = "".join(c if c.isalnum() or c in "-." else "_" for c in Path(name).stem)[:80]
    return stem or "input"


def run_predict(predictor, item, name: str, out_dir: str | Path, *, steps: int | None = None,
                seed: int = 0, starts: int | None = None, source: str = "") -> Shown:
    """Predict ``item`` (an image path, or a BEV sample) and gather what the page shows; the
    files ``densediff predict`` writes (with the uncertainty maps) and ``<stem>_summary.json``
    go to ``out_dir``. UserError for bad input."""
    pred = predictor.predict(item, steps=steps, seed=seed, starts=starts)
    stem = _stem(name)
    out = Path(out_dir)
    written = pred.save(out, stem, uncertainty=True, note=lambda _text: None)
    summary = {"source": source, "input": name, "seed": seed if predictor.is_diffusion else None,
               "starts": starts, **pred.summary()}
    from densediff.utils.fs import atomic_write

    path = out / f"{stem}_summary.json"
    text = json.dumps(summary, indent=1)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text), what="app")
    n = pred.num_steps
    return Shown(pred=pred, input=pred.input_view(), prediction=pred.prediction_view(),
                 uncertainty=pred.uncertainty_view(), step=pred.step_view(n) if n else None,
                 num_steps=n, summary=summary,
                 files=[str(out / f"{stem}_{k}") for k in written] + [str(path)])


def error_text(err: BaseException) -> str:
    """The one-line message the page shows for ``err``."""
    if isinstance(err, UserError):
        text = str(err)
        if "\n" in text and "Original Traceback" in text:  # re-raised from a worker
            text = text.strip().splitlines()[-1]
        return terminal_line(text)
    if isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and (
            "out of memory" in str(err) or "can't allocate memory" in str(err))):
        return "out of memory: try a smaller image or fewer steps / random starts"
    traceback.print_exception(err, file=sys.stderr)
    return f"internal error ({type(err).__name__}: {one_line(err, 120)}); see the server's log"


# ------------------------------------------------------------------------------------------
# the page


@dataclass
class App:
    """A built page: the Gradio ``blocks``, the folders it may serve files from and where it
    writes the downloads. :meth:`launch` serves it."""

    blocks: Any
    allowed_paths: list[str]
    workdir: tempfile.TemporaryDirectory

    def launch(self, host: str = "127.0.0.1", port: int | None = None, block: bool = True,
               quiet: bool = False) -> str:
        """Serve the page on ``host:port`` (None: the first free port from 7860); returns the
        local URL. ``block``: serve until interrupted (Ctrl-C), else return at once (tests)."""
        try:
            _, url, _ = self.blocks.launch(
                server_name=host, server_port=port, share=False, inbrowser=False,
                prevent_thread_lock=not block, show_error=False, quiet=quiet,
                allowed_paths=self.allowed_paths, max_file_size=MAX_UPLOAD, ssr_mode=False,
                css=CSS, footer_links=[])
        except OSError as e:  # the port is taken, the address is not this machine's
            raise UserError(f"app: cannot serve on {host}:{port or 'a free port'} "
                            f"({one_line(e, 160)})") from None
        return url

    def close(self) -> None:
        self.blocks.close()
        self.workdir.cleanup()


def _image_update(gr, picture, visible: bool = True):
    if picture is None:
        return gr.update(value=None, label="uncertainty: none for this prediction",
                         visible=visible)
    return gr.update(value=picture.image, label=picture.title, visible=visible)


def _picture(gr, label: str, elem_id: str, visible: bool = True):
    """A picture output; PNG, so the pixels arrive as drawn (Gradio's default, WebP, is
    lossy)."""
    return gr.Image(label=label, format="png", interactive=False, height=PICTURE_HEIGHT,
                    elem_classes=["dd-picture"], visible=visible, elem_id=elem_id)


def _cleared(gr) -> tuple:
    """The page's outputs cleared: status, input, prediction + key, uncertainty + key, step
    slider, step picture + key, downloads, summary, state."""
    return (None, gr.update(value=None), gr.update(value=None), "", gr.update(value=None),
            "", gr.update(value=1, maximum=2, visible=False),
            gr.update(value=None, visible=False), "", None, None, None)


def _shown(gr, status: str, shown) -> tuple:
    """The page's outputs (as :func:`_cleared` orders them) showing a prediction."""
    n = shown.num_steps
    return (status,
            _image_update(gr, shown.input),
            _image_update(gr, shown.prediction), key_html(shown.prediction),
            _image_update(gr, shown.uncertainty),
            "" if shown.uncertainty is None else key_html(shown.uncertainty),
            # a slider needs two values: one step shows its picture without one
            gr.update(value=n, minimum=1, maximum=max(n, 2), visible=n > 1),
            _image_update(gr, shown.step, visible=n > 0),
            "" if shown.step is None else key_html(shown.step),
            shown.files, shown.summary, shown.pred)


def _input_column(gr, pipe, model, steps_max: int, default_starts: int, starts_ok: bool,
                  examples):
    """The left column: the input (an upload and examples, or a BEV split and sample index),
    steps, seed, random starts, the button and the status line."""
    diffusion = model.max_steps != 0
    with gr.Column(scale=1, min_width=260):
        if pipe.image_input:
            upload = gr.File(label="image", type="filepath", file_count="single",
                             elem_id="upload")
            split = index = gr.State(None)
            if examples:
                gr.Examples([[str(p)] for p in examples], inputs=[upload],
                            label="examples", examples_per_page=12)
        else:
            upload = gr.State(None)
            split = gr.Dropdown(["val", "test", "train"], value="val", label="split",
                                elem_id="split")
            index = gr.Number(value=0, precision=0, minimum=0, label="sample index",
                              elem_id="index")
        steps = gr.Slider(model.min_steps if diffusion else 0,
                          steps_max if diffusion else 1, step=1,
                          value=model.default_steps if diffusion else 0,
                          label="sampling steps", visible=diffusion, elem_id="steps")
        seed = gr.Number(value=0, precision=0, minimum=0, label="seed",
                         visible=diffusion, elem_id="seed")
        starts = gr.Slider(1, max(STARTS_CAP, default_starts), step=1,
                           value=default_starts, visible=starts_ok,
                           label="random starts (outputs averaged)", elem_id="starts")
        run = gr.Button("Predict", variant="primary", elem_id="run")
        status = gr.Markdown(elem_id="status")
    return upload, split, index, steps, seed, starts, run, status


def _output_column(gr, picture):
    """The right column: input, prediction and uncertainty pictures with their keys, the step
    slider and picture, the downloads and the JSON summary."""
    with gr.Column(scale=3):
        with gr.Row(equal_height=False):
            with gr.Column(min_width=160):
                shown_input = picture("input", "input-picture")
            with gr.Column(min_width=160):
                prediction = picture("prediction", "prediction")
                prediction_key = gr.HTML(elem_id="prediction-key")
            with gr.Column(min_width=160):
                uncertainty = picture("uncertainty", "uncertainty")
                uncertainty_key = gr.HTML(elem_id="uncertainty-key")
        with gr.Row(equal_height=False):
            with gr.Column(min_width=160):
                step = gr.Slider(1, 2, step=1, value=1, label="trajectory: sampling step",
                                 visible=False, elem_id="step-slider")
                step_picture = picture("step", "step-picture", visible=False)
                step_key = gr.HTML(elem_id="step-key")
            with gr.Column(min_width=160):
                downloads = gr.File(label="downloads (mask, uncertainty map, JSON)",
                                    file_count="multiple", interactive=False,
                                    elem_id="downloads")
                summary = gr.JSON(label="summary", elem_id="summary")
    return (shown_input, prediction, prediction_key, uncertainty, uncertainty_key, step,
            step_picture, step_key, downloads, summary)


def build_app(predictor, source: str = "", examples: Sequence[str | Path] = ()) -> App:
    """The page of ``predictor`` (``source``: how the page names the checkpoint;
    ``examples``: image files offered under the upload, see :func:`list_examples`)."""
    from densediff.pipelines.base import default_starts

    gr = require_gradio()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    pipe, model = predictor.pipeline, predictor.model
    diffusion = predictor.is_diffusion
    starts_ok = predictor.takes_starts
    workdir = tempfile.TemporaryDirectory(prefix="densediff-app-")
    name = Path(str(source)).name or "model"
    cfg = predictor.cfg
    title = f"densediff: {name} ({pipe.name} {cfg.model.type})"

    if diffusion:
        top = model.max_steps if model.max_steps is not None else STEPS_CAP
        steps_max = min(top, max(STEPS_CAP, model.default_steps))
    starts_default = default_starts(model)

    def predict(upload, split, index, steps, seed, starts):
        blank = _cleared(gr)
        label = ""
        try:
            if pipe.image_input:
                if not upload:
                    return ("Upload an image or pick an example.", *blank[1:])
                item, label = upload, Path(upload).name
            else:
                if split is None or index is None:
                    return ("Pick a split and a sample index.", *blank[1:])
                dataset = predictor.dataset(str(split))
                from densediff.utils.checks import check_int

                i = check_int(index, "sample index", 0, max(len(dataset) - 1, 0))
                item = dataset[i]
                label = f"{split}:{i}:{item['meta'].get('name', i)}"
            out = Path(workdir.name) / uuid.uuid4().hex
            shown = run_predict(
                predictor, item, label, out, source=name,
                steps=int(steps) if diffusion else None,
                seed=int(seed) if diffusion else 0,
                starts=int(starts) if starts_ok and int(starts) != starts_default else None)
        except Exception as e:  # noqa: BLE001 (every failure: one line on the page)
            text = error_text(e)
            if upload:  # name the upload as the user knows it, not Gradio's cache path
                text = text.replace(str(upload), Path(upload).name)
            return (f"**error:** {html.escape(text)}", *blank[1:])
        status = (f"{html.escape(label)}: {shown.prediction.title}"
                  + (f", seed {int(seed)}" if diffusion else ""))
        return _shown(gr, status, shown)

    def show_step(pred, step):
        if pred is None or not pred.num_steps:
            return gr.update(), gr.update()
        try:
            picture = pred.step_view(int(step))
        except Exception as e:  # noqa: BLE001
            return gr.update(label=f"error: {error_text(e)}"), ""
        return _image_update(gr, picture), key_html(picture)

    def picture(label: str, elem_id: str, visible: bool = True):
        return _picture(gr, label, elem_id, visible)

    with gr.Blocks(title=title, analytics_enabled=False) as blocks:
        gr.Markdown(f"## {html.escape(title)}")
        state = gr.State(None)
        with gr.Row():
            upload, split, index, steps, seed, starts, run, status = _input_column(
                gr, pipe, model, steps_max if diffusion else 1, starts_default, starts_ok,
                examples)
            (shown_input, prediction, prediction_key, uncertainty, uncertainty_key, step,
             step_picture, step_key, downloads, summary) = _output_column(gr, picture)
        outputs = [status, shown_input, prediction, prediction_key, uncertainty,
                   uncertainty_key, step, step_picture, step_key, downloads, summary, state]
        triggers = [run.click] + ([upload.change] if pipe.image_input else [])
        gr.on(triggers, predict, inputs=[upload, split, index, steps, seed, starts],
              outputs=outputs, api_name="predict", concurrency_limit=1)
        step.change(show_step, inputs=[state, step], outputs=[step_picture, step_key],
                    api_name="step", concurrency_limit=1)
    allowed = sorted({str(Path(p).resolve().parent) for p in examples} | {workdir.name})
    return App(blocks=blocks, allowed_paths=allowed, workdir=workdir)
