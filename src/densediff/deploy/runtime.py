"""The onnxruntime model: an export folder (:mod:`densediff.deploy.export`) behind the model
interface the task pipelines use, so that :class:`~densediff.api.Predictor` (``predict``, the
result's ``.save``) works unchanged with onnxruntime doing the network work.

- DDP (:class:`OnnxDDP`): ``extract`` runs ``encoder.onnx`` and ``denoise_step`` runs
  ``step.onnx`` (the decoder's prediction and its re-encoded x0, as ``DDP.denoise_step``);
  ``sample_steps`` is DDP's own (:class:`~densediff.models.ddp.MapSampling`), with the
  sampler settings ``deploy.json`` records, so the seeded noise (one ``torch.Generator(seed)``
  per image) and hence the result for a seed are those of PyTorch;
- discriminative models (:class:`OnnxSegmentor`): ``encoder.onnx`` and ``head.onnx``, then
  the upsampling of ``predict_map``.

Both satisfy :class:`~densediff.models.interface.DenseModel`; the output kind and the graphs'
input names are read from ``deploy.json`` (derived from the stored config for exports that
predate those entries: :func:`_complete`).

The graphs take images of the size they were exported at (``deploy.json`` ``input_size``).
A preprocessed image of another size (after ``data.test_scale``) is resized bilinearly to it,
as the multi-scale test resizes its passes, and the outputs are resized back to the image's
own size as always: the result then differs a little from PyTorch's, which runs the model at
the image's own size. Export at the size your images have (``densediff export --size``) for
identical results; sliding-window configs (``eval.mode: slide``) export at the window size.

Only torch (for the sampler's arithmetic) and onnxruntime are needed; no checkpoint.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from densediff.deploy.export import (
    DEPLOY_FILE,
    FORMAT,
    FORMAT_VERSION,
    ONNX_HINT,
    session_options,
)
from densediff.diffusion.schedules import get_schedule
from densediff.errors import UserError, one_line, terminal_line
from densediff.limits import MAX_DEPLOY_BYTES
from densediff.models.ddp import MapSampling
from densediff.models.interface import OUTPUT_KINDS, Trajectory
from densediff.tasks import TASKS
from densediff.utils.checks import short_repr

__all__ = ["OnnxDDP", "OnnxSegmentor", "load_onnx_model", "load_runtime", "read_deploy"]


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise UserError(f"the onnx runtime needs onnxruntime: {ONNX_HINT}") from None
    return onnxruntime


class _Session:
    """One graph: numpy in, torch out."""

    def __init__(self, path: Path, threads: int | None, providers: list[str] | None):
        from densediff.utils.checks import path_kind

        ort = _onnxruntime()
        if not path.is_file():
            kind = path_kind(path)
            raise UserError(f"{path}: missing (the export folder is incomplete; export again)"
                            if kind == "missing" else f"{path}: is {kind}, not an ONNX graph file")
        opts = session_options(ort, threads)
        try:
            self.sess = ort.InferenceSession(str(path), opts,
                                             providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own error types (Fail, InvalidGraph...)
            raise UserError(f"{path}: onnxruntime cannot load it ({one_line(e)})") from None
        self.inputs = [i.name for i in self.sess.get_inputs()]

    def __call__(self, *args: torch.Tensor, **named: torch.Tensor) -> list[torch.Tensor]:
        """Inputs in the graph's order, or by name (names the graph does not take, e.g. a
        ``log_snr`` that a decoder without time input never reads, are dropped)."""
        pairs = zip(self.inputs, args) if args else ((n, named[n]) for n in self.inputs)
        feeds = {n: a.detach().cpu().float().contiguous().numpy() for n, a in pairs}
        return [torch.from_numpy(np.asarray(o)) for o in self.sess.run(None, feeds)]


class _OnnxModel:
    """What the runtime models share: one onnxruntime session per graph of ``deploy.json``
    (``sessions``; ``encoder.onnx`` behind ``extract``), the fixed input size,
    :meth:`predict_map`, and the ``to`` / ``eval`` calls :class:`~densediff.api.Predictor`
    makes. ``meta``: ``deploy.json`` as :func:`load_runtime` completes it."""

    default_steps = min_steps = max_steps = 0
    accumulation = False

    def __init__(self, folder: Path, meta: dict, cfg, threads: int | None,
                 providers: list[str] | None):
        self.meta = meta
        self.cfg = cfg
        self.output_kind = meta["output_kind"]
        self.sessions = {graph: _Session(folder / name, threads, providers)
                         for graph, name in meta["graphs"].items()}
        self.encoder = self.sessions["encoder"]
        self.input_size = tuple(int(v) for v in meta["input_size"])
        self._noted: set[tuple[int, int]] = set()

    def to(self, device):
        if torch.device(device).type != "cpu":
            raise UserError(f"device {str(device)!r}: the onnx runtime runs on the CPU")
        return self

    def eval(self):
        return self

    def _fit(self, img: torch.Tensor) -> torch.Tensor:
        """``img`` at the exported input size (bilinear, as the multi-scale test); a note on
        stderr the first time a size is resized."""
        size = tuple(img.shape[-2:])
        if size == self.input_size:
            return img
        if size not in self._noted:
            self._noted.add(size)
            (h, w), (eh, ew) = size, self.input_size
            print(f"note: {h}x{w} input resized to the exported {eh}x{ew} (deploy.json "
                  f"input_size), so results differ from PyTorch's; export with --size {h} {w} "
                  "to match", file=sys.stderr)
        return F.interpolate(img.float(), size=self.input_size, mode="bilinear",
                             align_corners=False)

    def extract(self, img: torch.Tensor) -> torch.Tensor:
        """B x C x h x w features of ``encoder.onnx`` (the image resized to the export size
        first if it differs)."""
        return self.encoder(self._fit(img))[0]

    def predict_map(self, img: torch.Tensor, steps: int | None = None,
                    accumulation: bool | None = None, **settings) -> torch.Tensor:
        """As :meth:`densediff.models.interface.MapModel.predict_map`: the trajectory's
        output at the input size."""
        traj = self.sample_steps(self.extract(img), self.default_steps if steps is None
                                 else steps, **settings)
        out = traj.output(self.accumulation if accumulation is None else accumulation)
        return F.interpolate(out, size=tuple(img.shape[-2:]), mode="bilinear",
                             align_corners=False)


class OnnxDDP(MapSampling, _OnnxModel):
    """A DDP model (segmentation or depth) on ``encoder.onnx`` + ``step.onnx``: ``extract``
    and ``denoise_step`` wrap the graphs, and :meth:`sample_steps` is DDP's own
    (:class:`~densediff.models.ddp.MapSampling`), with the sampler settings of
    ``deploy.json``."""

    def __init__(self, folder: Path, meta: dict, cfg, threads: int | None = None,
                 providers: list[str] | None = None):
        super().__init__(folder, meta, cfg, threads, providers)
        self.step = self.sessions["step"]
        self.diffusion_cfg = cfg.model.diffusion.model_copy(
            update={k: meta["sampler"][k] for k in SAMPLER_KEYS})
        self.schedule = get_schedule(self.diffusion_cfg.schedule)
        self.map_channels = int(meta["map_channels"])

    def denoise_step(self, feat: torch.Tensor, x_t: torch.Tensor, log_snr: torch.Tensor,
                     x0_prev: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One ``step.onnx`` call: the decoder's prediction and its re-encoded x0 (as
        ``DDP.denoise_step``; the inputs the graph takes, ``x0_prev`` None = zeros)."""
        named = {"features": feat, "x_t": x_t, "log_snr": log_snr}
        if "x0_prev" in self.step.inputs:  # as DDP.denoise: no estimate yet = zeros
            named["x0_prev"] = torch.zeros_like(x_t) if x0_prev is None else x0_prev
        pred, x0 = self.step(**named)
        return pred, x0

    def denoise(self, feat: torch.Tensor, x_t: torch.Tensor, log_snr: torch.Tensor,
                x0_prev: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's prediction of one ``step.onnx`` call (as ``DDP.denoise``)."""
        return self.denoise_step(feat, x_t, log_snr, x0_prev)[0]

    @torch.no_grad()
    def decoder_step(self, feat: torch.Tensor) -> torch.Tensor:
        """One ``step.onnx`` call at t = 0.5 on random input (as ``DDP.decoder_step``, for
        ``densediff bench``)."""
        b, _, h, w = feat.shape
        x_t = torch.randn(b, self.map_channels, h, w)
        return self.denoise(feat, x_t, self.schedule(torch.full((b,), 0.5)))


class OnnxSegmentor(_OnnxModel):
    """A discriminative model (segmentation or depth) on ``encoder.onnx`` + ``head.onnx``."""

    def __init__(self, folder: Path, meta: dict, cfg, threads: int | None = None,
                 providers: list[str] | None = None):
        super().__init__(folder, meta, cfg, threads, providers)
        self.head_graph = self.sessions["head"]

    def head(self, feat: torch.Tensor) -> torch.Tensor:
        """The head's output on the feature grid (depth: in metres)."""
        return self.head_graph(feat)[0]

    def sample_steps(self, feat: torch.Tensor, steps: int = 0, **settings) -> Trajectory:
        """The head's output as a one-step trajectory (``steps`` must be 0)."""
        if steps != 0:
            raise ValueError(f"a discriminative model takes steps = 0, got {steps}")
        return Trajectory([self.head(feat)[:, None]], self.output_kind)


_REQUIRED = ("task", "kind", "input_size", "graphs", "config")
_GRAPHS = {"ddp": ("encoder", "step"), "discriminative": ("encoder", "head")}
_KIND_OF_TYPE = {"ddp": "ddp", "segmentor": "discriminative"}
_GRAPH_INPUTS = {"encoder": (("image",), ()), "head": (("features",), ()),
                 "step": (("features", "x_t"), ("log_snr", "x0_prev"))}
"""Each graph's inputs, in order: (always, optional). ``step.onnx`` takes ``log_snr`` when the
decoder reads the time, ``x0_prev`` with self-conditioning."""
SAMPLER_KEYS = ("schedule", "steps", "td", "sampler", "randsteps", "accumulation",
                "sample_start", "self_condition")
"""The entries of ``deploy.json``'s ``sampler`` the runtime samples with (the
``model.diffusion`` keys of the same names)."""


def read_deploy(folder: str | os.PathLike) -> dict:
    """``folder/deploy.json``, checked against its schema: UserError naming the file and the
    entry when it is missing, not JSON, nested too deep, of another format or version, or when
    an entry is missing, of the wrong type or out of bounds. Its agreement with the stored
    config and the graphs is checked by :func:`load_runtime`. The ``sampler`` settings come
    back as the config types them."""
    meta, path = _read_json(Path(folder))
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise UserError(f"{path}: the entry {missing[0]!r} is missing")
    exportable = [name for name, spec in TASKS.items() if not spec.export_refusal]
    if meta["task"] not in exportable:
        raise UserError(f"{path}: 'task' must be {' or '.join(exportable)}, got "
                        f"{short_repr(meta['task'])}")
    kind = meta["kind"]
    graphs = _GRAPHS.get(kind) if isinstance(kind, str) else None
    if graphs is None:
        raise UserError(f"{path}: unknown kind {short_repr(kind)} (expected ddp or discriminative)")
    named = meta["graphs"]
    if (not isinstance(named, dict) or set(named) != set(graphs)
            or not all(isinstance(named[g], str) and Path(named[g]).name == named[g]
                       and named[g] not in ("", ".", "..") for g in graphs)
            or len({named[g] for g in graphs}) != len(graphs)):
        raise UserError(f"{path}: 'graphs' must name the {' and '.join(graphs)} graph files "
                        "in the folder (two different files)")
    _check_sizes(meta, path)
    if kind == "ddp":
        if "sampler" not in meta:
            raise UserError(f"{path}: the entry 'sampler' is missing")
        meta["sampler"] = {**meta["sampler"], **sampler_settings(meta["sampler"], path)}
    if "output_kind" in meta and meta["output_kind"] not in OUTPUT_KINDS:
        raise UserError(f"{path}: 'output_kind' must be one of {', '.join(OUTPUT_KINDS)}, got "
                        f"{short_repr(meta['output_kind'])}")
    if "inputs" in meta:
        _check_inputs(meta["inputs"], graphs, path)
    classes = meta.get("classes")
    if classes is not None and (not isinstance(classes, list) or len(classes) > 4096
                                or not all(isinstance(c, str) for c in classes)):
        raise UserError(f"{path}: 'classes' must be a list of class names")
    if not isinstance(meta["config"], dict):
        raise UserError(f"{path}: 'config' must be a mapping (the checkpoint's config)")
    return meta


def _read_json(folder: Path) -> tuple[dict, Path]:
    """``folder/deploy.json`` as a dict of this format and version, and its path."""
    from densediff.utils.checks import json_loads, path_kind, read_text

    if not folder.is_dir():
        kind = path_kind(folder)
        raise UserError(f"{folder}: {'no such folder' if kind == 'missing' else 'is ' + kind} "
                        "(expected a folder written by `densediff export`)")
    path = folder / DEPLOY_FILE
    if not path.exists() and not path.is_symlink():
        raise UserError(f"{path}: missing; {folder} is not a (complete) `densediff export` "
                        "folder")
    meta = json_loads(read_text(path, max_bytes=MAX_DEPLOY_BYTES, kind="JSON file"), str(path))
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path}: not a densediff export description (format is not {FORMAT!r})")
    version = meta.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise UserError(f"{path}: format_version {version!r} is not supported (this densediff "
                        f"reads version {FORMAT_VERSION}); export the checkpoint again")
    return meta, path


def _check_sizes(meta: dict, path: Path) -> None:
    """``input_size``, ``map_channels`` (DDP), ``feature_channels``, ``opset``,
    ``feature_grid``: present where needed, integers in bounds."""
    from densediff.utils.checks import check_int, check_size

    try:
        check_size(meta["input_size"], f"{path}: 'input_size'")
        if meta["kind"] == "ddp":
            if "map_channels" not in meta:
                raise UserError(f"{path}: the entry 'map_channels' is missing")
            check_int(meta["map_channels"], f"{path}: 'map_channels'", 1, 8192)
        for key, high in (("feature_channels", 8192), ("opset", 100)):
            if key in meta:
                check_int(meta[key], f"{path}: {key!r}", 1, high)
        if "feature_grid" in meta:
            grid = meta["feature_grid"]
            if not isinstance(grid, list) or len(grid) != 2:
                raise UserError(f"{path}: 'feature_grid' must be [h, w], got {short_repr(grid)}")
            for v in grid:
                check_int(v, f"{path}: 'feature_grid'", 1, 8192)
    except UserError as e:
        raise UserError(str(e)) from None


def _check_inputs(inputs, graphs: tuple[str, ...], path: Path) -> None:
    """``inputs``: for each graph, its input names as :data:`_GRAPH_INPUTS` allows them."""
    if not isinstance(inputs, dict) or set(inputs) != set(graphs):
        raise UserError(f"{path}: 'inputs' must list the inputs of the graphs "
                        f"{' and '.join(graphs)}")
    for graph in graphs:
        names, (always, optional) = inputs[graph], _GRAPH_INPUTS[graph]
        if not isinstance(names, list) or names != [*always, *(n for n in optional
                                                               if n in names)]:
            raise UserError(f"{path}: 'inputs.{graph}' must be {list(always)} followed by any "
                            f"of {list(optional)}, got {short_repr(names)}")


def sampler_settings(entries, path: Path | str) -> dict:
    """``deploy.json``'s ``sampler`` entries as the config checks them
    (:class:`~densediff.config.DiffusionConfig`): ``{key: value}`` for :data:`SAMPLER_KEYS`.
    UserError naming the entry when one is missing or invalid."""
    from pydantic import ValidationError

    from densediff.config import DiffusionConfig

    if not isinstance(entries, dict):
        raise UserError(f"{path}: 'sampler' must be a mapping of sampler settings, got "
                        f"{short_repr(entries)}")
    missing = [k for k in SAMPLER_KEYS if k not in entries]
    if missing:
        raise UserError(f"{path}: the entry 'sampler.{missing[0]}' is missing")
    try:
        checked = DiffusionConfig.model_validate(entries)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        msg = "unknown entry" if err["type"] == "extra_forbidden" else terminal_line(err["msg"])
        raise UserError(f"{path}: 'sampler.{key}': {msg} (got "
                        f"{short_repr(err.get('input'))})") from None
    return {k: getattr(checked, k) for k in SAMPLER_KEYS}


def _check_agrees(meta: dict, cfg, names: list[str], path: Path) -> None:
    """``deploy.json``'s entries against its stored config: task, model type, classes."""
    if cfg.task != meta["task"]:
        raise UserError(f"{path}: 'task' is {meta['task']} but its config's task is {cfg.task}")
    kind = _KIND_OF_TYPE.get(cfg.model.type)
    if kind != meta["kind"]:
        raise UserError(f"{path}: 'kind' is {meta['kind']} but its config's model.type is "
                        f"{cfg.model.type}")
    if "model_type" in meta and meta["model_type"] != cfg.model.type:
        raise UserError(f"{path}: 'model_type' is {short_repr(meta['model_type'])} but its config's "
                        f"model.type is {cfg.model.type}")
    if meta.get("classes") is not None and list(meta["classes"]) != list(names):
        raise UserError(f"{path}: 'classes' ({len(meta['classes'])}) differ from its config's "
                        f"classes ({len(names)})")


def _check_graph(session: _Session, path: Path, expected: list[tuple[str, list]]) -> list:
    """The graph's inputs against ``expected`` ``(name, dims)`` (None: any size); UserError
    naming the graph when they differ (swapped or foreign graphs). Returns the graph's first
    output's dims."""
    got = [(i.name, list(i.shape)) for i in session.sess.get_inputs()]
    names = [n for n, _ in got]
    if names != [n for n, _ in expected]:
        raise UserError(f"{path}: its inputs are {names}, expected {[n for n, _ in expected]} "
                        "(graphs swapped, or not from this export)")
    for (name, dims), (_, want) in zip(got, expected):
        ok = len(dims) == len(want) and all(
            w is None or not isinstance(d, int) or d == w for d, w in zip(dims, want))
        if not ok:
            raise UserError(f"{path}: input {name!r} has shape {dims}, but deploy.json asks for "
                            f"{['N' if w is None else w for w in want]}")
    return list(session.sess.get_outputs()[0].shape)


def load_runtime(folder: str | os.PathLike, threads: int | None = None,
                 providers: list[str] | None = None):
    """An export folder as ``(runtime model, cfg, class names, palette)``, like
    :func:`densediff.api.load_model`. ``threads``: onnxruntime's intra-op threads (None:
    ``torch.get_num_threads()``); ``providers``: onnxruntime execution providers (None: CPU;
    the tensors stay on the CPU either way)."""
    from densediff.tasks import class_info, config_from_dict

    folder = Path(folder)
    meta = read_deploy(folder)
    _onnxruntime()  # before any other work: one line naming the extra to install
    path = folder / DEPLOY_FILE
    cfg = config_from_dict(meta["config"], source=f"{path}: config")
    names, palette = class_info(cfg)
    _check_agrees(meta, cfg, names, path)
    meta = _complete(meta, cfg, path)
    cls = OnnxDDP if meta["kind"] == "ddp" else OnnxSegmentor
    model = cls(folder, meta, cfg, threads, providers)
    _check_graphs(model, meta, folder, len(names))
    return model, cfg, names, palette


def _complete(meta: dict, cfg, path: Path) -> dict:
    """``deploy.json`` with the entries older exports lack derived from its config (here
    only): ``output_kind`` (the task's, :data:`densediff.tasks.TASKS`) and ``inputs`` (the
    step graph takes ``log_snr`` unless the decoder never reads the time, ``x0_prev`` with
    self-conditioning). UserError when ``sampler.self_condition`` and the step graph's
    inputs disagree."""
    meta = dict(meta)
    meta.setdefault("output_kind", TASKS[meta["task"]].output_kind)
    if "inputs" not in meta:
        d = cfg.model.diffusion
        step = ["features", "x_t", *(["log_snr"] if d.time_input != "none" or d.precondition
                                     else []), *(["x0_prev"] if d.self_condition else [])]
        given = {"encoder": ["image"], "step": step, "head": ["features"]}
        meta["inputs"] = {graph: given[graph] for graph in meta["graphs"]}
    if meta["kind"] == "ddp":
        takes = "x0_prev" in meta["inputs"]["step"]
        if meta["sampler"]["self_condition"] != takes:
            raise UserError(f"{path}: 'sampler.self_condition' is "
                            f"{meta['sampler']['self_condition']}, but the step graph "
                            f"{'takes' if takes else 'has no'} x0_prev input")
    return meta


def _check_graphs(model, meta: dict, folder: Path, num_classes: int) -> None:
    """Every graph's inputs against ``deploy.json``'s ``inputs`` and the encoder's output,
    and the per-step graph's output against ``output_kind``, before any image."""
    h, w = meta["input_size"]
    g = meta["graphs"]
    feat = _check_graph(model.encoder, folder / g["encoder"], [("image", [None, 3, h, w])])
    fdims = [None] + [d if isinstance(d, int) else None for d in feat[1:]]
    if len(fdims) != 4:
        raise UserError(f"{folder / g['encoder']}: its output is not B x C x h x w features")
    c = meta.get("map_channels")
    dims = {"features": fdims, "x_t": [None, c, *fdims[2:]], "log_snr": [None],
            "x0_prev": [None, c, *fdims[2:]]}
    [call] = [name for name in g if name != "encoder"]  # step or head: run per sampling step
    graph = folder / g[call]
    pred = _check_graph(model.sessions[call], graph, [(n, dims[n]) for n in meta["inputs"][call]])
    depth = meta["output_kind"] == "depth"
    want = 1 if depth else num_classes
    if len(pred) != 4 or (isinstance(pred[1], int) and pred[1] != want):
        raise UserError(f"{graph}: its output has shape {pred}, but its config gives {want} "
                        f"{'depth channel' if depth else 'classes'}")


def load_onnx_model(folder: str | os.PathLike, threads: int | None = None,
                    providers: list[str] | None = None):
    """The runtime model of an export folder alone (:class:`OnnxDDP` or
    :class:`OnnxSegmentor`); see :func:`load_runtime`."""
    return load_runtime(folder, threads, providers)[0]
