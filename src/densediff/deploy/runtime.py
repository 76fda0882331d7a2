"""The onnxruntime model: an export folder (:mod:`densediff.deploy.export`) behind the model
interface the task pipelines use, so that :class:`~densediff.api.Predictor` (``predict``, the
result's ``.save``) works unchanged with onnxruntime doing the network work.

- DDP (:class:`OnnxDDP`): ``extract`` runs ``encoder.onnx``; ``sample_steps`` runs the
  library's sampler (:func:`densediff.diffusion.samplers.sample_map`, the function
  ``DDP.sample_steps`` runs) with ``step.onnx`` as the map decoder, so the seeded noise (one
  ``torch.Generator(seed)`` per image) and hence the result for a seed are those of PyTorch;
- discriminative models (:class:`OnnxSegmentor`): ``encoder.onnx`` and ``head.onnx``, then
  the upsampling of ``predict_logits`` / ``predict_depth``.

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

from densediff.deploy.export import DEPLOY_FILE, FORMAT, FORMAT_VERSION, ONNX_HINT
from densediff.errors import UserError, one_line
from densediff.models.interface import Trajectory
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
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
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
    """What the runtime models share: ``encoder.onnx`` behind ``extract``, the fixed input
    size, and the ``to`` / ``eval`` calls :class:`~densediff.api.Predictor` makes."""

    default_steps = min_steps = max_steps = 0
    accumulation = False

    def __init__(self, folder: Path, meta: dict, cfg, threads: int | None,
                 providers: list[str] | None):
        self.meta = meta
        self.cfg = cfg
        self.task = meta["task"]
        self.output_kind = "depth" if self.task == "depth" else "classes"
        self.encoder = _Session(folder / meta["graphs"]["encoder"], threads, providers)
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

    @staticmethod
    def _up(x: torch.Tensor, size) -> torch.Tensor:
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)

    def extract(self, img: torch.Tensor) -> torch.Tensor:
        """B x C x h x w features of ``encoder.onnx`` (the image resized to the export size
        first if it differs)."""
        return self.encoder(self._fit(img))[0]


class OnnxDDP(_OnnxModel):
    """A DDP model (segmentation or depth) on ``encoder.onnx`` + ``step.onnx``; the model
    interface of :class:`~densediff.models.DDP` that prediction uses (``extract``,
    ``sample_steps``, ``predict_logits`` / ``predict_depth``, ``default_steps`` ...)."""

    min_steps = 1
    max_steps = None

    def __init__(self, folder: Path, meta: dict, cfg, threads: int | None = None,
                 providers: list[str] | None = None):
        from densediff.diffusion.schedules import get_schedule

        super().__init__(folder, meta, cfg, threads, providers)
        self.step = _Session(folder / meta["graphs"]["step"], threads, providers)
        self.diffusion_cfg = cfg.model.diffusion
        self.schedule = get_schedule(self.diffusion_cfg.schedule)
        self.map_channels = int(meta["map_channels"])

    default_steps = property(lambda self: self.diffusion_cfg.steps)
    accumulation = property(lambda self: self.diffusion_cfg.accumulation)

    def denoise_step(self, feat: torch.Tensor, x_t: torch.Tensor, log_snr: torch.Tensor,
                     x0_prev: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One ``step.onnx`` call: the decoder's prediction and its re-encoded x0."""
        named = {"features": feat, "x_t": x_t, "log_snr": log_snr}
        if self.diffusion_cfg.self_condition:  # as DDP.denoise: no estimate yet = zeros
            named["x0_prev"] = torch.zeros_like(x_t) if x0_prev is None else x0_prev
        pred, x0 = self.step(**named)
        return pred, x0

    @torch.no_grad()
    def decoder_step(self, feat: torch.Tensor) -> torch.Tensor:
        """One ``step.onnx`` call at t = 0.5 on random input (as ``DDP.decoder_step``, for
        ``densediff bench``)."""
        b, _, h, w = feat.shape
        x_t = torch.randn(b, self.map_channels, h, w)
        return self.denoise_step(feat, x_t, self.schedule(torch.full((b,), 0.5)))[0]

    @torch.no_grad()
    def sample_steps(self, feat: torch.Tensor, steps: int, *, td: float | None = None,
                     sampler: str | None = None, randsteps: int | None = None,
                     seeds=None):
        """:meth:`densediff.models.DDP.sample_steps` with ``step.onnx`` as the decoder."""
        from densediff.diffusion.samplers import sample_map

        d = self.diffusion_cfg
        x0_of: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def denoise(f, x, ls, x0_prev=None):
            pred, x0 = self.denoise_step(f, x, ls, x0_prev)
            x0_of[id(pred)] = (pred, x0)  # the graph re-encodes; to_x0 looks it up
            return pred

        def to_x0(pred: torch.Tensor) -> torch.Tensor:
            return x0_of[id(pred)][1]

        preds = sample_map(denoise, to_x0, feat, self.map_channels, self.schedule, steps,
                           td=d.td if td is None else td,
                           sampler=d.sampler if sampler is None else sampler,
                           randsteps=d.randsteps if randsteps is None else randsteps,
                           seeds=seeds, start=d.sample_start, self_condition=d.self_condition)
        return Trajectory(preds, self.output_kind)

    def predict_map(self, img: torch.Tensor, steps: int | None = None,
                    accumulation: bool | None = None, **kwargs) -> torch.Tensor:
        """As :meth:`densediff.models.interface.MapModel.predict_map`."""
        traj = self.sample_steps(self.extract(img), self.default_steps if steps is None
                                 else steps, **kwargs)
        acc = self.accumulation if accumulation is None else accumulation
        return self._up(traj.output(acc), img.shape[-2:])


class OnnxSegmentor(_OnnxModel):
    """A discriminative model (segmentation or depth) on ``encoder.onnx`` + ``head.onnx``."""

    def __init__(self, folder: Path, meta: dict, cfg, threads: int | None = None,
                 providers: list[str] | None = None):
        super().__init__(folder, meta, cfg, threads, providers)
        self.head_graph = _Session(folder / meta["graphs"]["head"], threads, providers)

    def head(self, feat: torch.Tensor) -> torch.Tensor:
        """The head's output on the feature grid (depth: in metres)."""
        return self.head_graph(feat)[0]

    def sample_steps(self, feat: torch.Tensor, steps: int = 0, **settings) -> Trajectory:
        """The head's output as a one-step trajectory (``steps`` must be 0)."""
        if steps != 0:
            raise ValueError(f"a discriminative model takes steps = 0, got {steps}")
        return Trajectory([self.head(feat)[:, None]], self.output_kind)

    def predict_map(self, img: torch.Tensor, steps: int | None = None, **kwargs
                    ) -> torch.Tensor:
        """As :meth:`densediff.models.interface.MapModel.predict_map`: the head's output
        (logits, or depth in metres) at the input size."""
        return self._up(self.head(self.extract(img)), img.shape[-2:])


_REQUIRED = ("task", "kind", "input_size", "graphs", "config")
_GRAPHS = {"ddp": ("encoder", "step"), "discriminative": ("encoder", "head")}
_KIND_OF_TYPE = {"ddp": "ddp", "segmentor": "discriminative"}
MAX_DEPLOY_BYTES = 16 * 2**20
"""Largest ``deploy.json`` read (its config and class names take a few kB)."""


def read_deploy(folder: str | os.PathLike) -> dict:
    """``folder/deploy.json``, checked against its schema: UserError naming the file and the
    entry when it is missing, not JSON, nested too deep, of another format or version, or when
    an entry is missing, of the wrong type or out of bounds. Its agreement with the stored
    config and the graphs is checked by :func:`load_runtime`."""
    from densediff.utils.checks import (
        check_int,
        check_size,
        json_loads,
        path_kind,
        read_text,
    )

    folder = Path(folder)
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
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise UserError(f"{path}: the entry {missing[0]!r} is missing")
    if meta["task"] not in ("segmentation", "depth"):
        raise UserError(f"{path}: 'task' must be segmentation or depth, got "
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
    try:
        check_size(meta["input_size"], f"{path}: 'input_size'")
        if kind == "ddp":
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
    classes = meta.get("classes")
    if classes is not None and (not isinstance(classes, list) or len(classes) > 4096
                                or not all(isinstance(c, str) for c in classes)):
        raise UserError(f"{path}: 'classes' must be a list of class names")
    if not isinstance(meta["config"], dict):
        raise UserError(f"{path}: 'config' must be a mapping (the checkpoint's config)")
    return meta


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
    from densediff.config import config_from_dict
    from densediff.data import class_info

    folder = Path(folder)
    meta = read_deploy(folder)
    _onnxruntime()  # before any other work: one line naming the extra to install
    path = folder / DEPLOY_FILE
    cfg = config_from_dict(meta["config"], source=f"{path}: config")
    names, palette = class_info(cfg)
    _check_agrees(meta, cfg, names, path)
    cls = OnnxDDP if meta["kind"] == "ddp" else OnnxSegmentor
    model = cls(folder, meta, cfg, threads, providers)
    _check_graphs(model, meta, cfg, folder, len(names))
    return model, cfg, names, palette


def _check_graphs(model, meta: dict, cfg, folder: Path, num_classes: int) -> None:
    """Every graph's inputs against ``deploy.json`` and the other graph, before any image."""
    h, w = meta["input_size"]
    g = meta["graphs"]
    feat = _check_graph(model.encoder, folder / g["encoder"], [("image", [None, 3, h, w])])
    fdims = [None] + [d if isinstance(d, int) else None for d in feat[1:]]
    if len(fdims) != 4:
        raise UserError(f"{folder / g['encoder']}: its output is not B x C x h x w features")
    if meta["kind"] == "ddp":
        c = meta["map_channels"]
        d = cfg.model.diffusion
        inputs = [("features", fdims), ("x_t", [None, c, *fdims[2:]])]
        if d.time_input != "none" or d.precondition:  # else the decoder never reads the time
            inputs.append(("log_snr", [None]))
        if d.self_condition:
            inputs.append(("x0_prev", [None, c, *fdims[2:]]))
        graph = folder / g["step"]
        pred = _check_graph(model.step, graph, inputs)
    else:
        graph = folder / g["head"]
        pred = _check_graph(model.head_graph, graph, [("features", fdims)])
    want = 1 if meta["task"] == "depth" else num_classes
    if len(pred) != 4 or (isinstance(pred[1], int) and pred[1] != want):
        raise UserError(f"{graph}: its output has shape {pred}, but its config gives {want} "
                        f"{'depth channel' if meta['task'] == 'depth' else 'classes'}")


def load_onnx_model(folder: str | os.PathLike, threads: int | None = None,
                    providers: list[str] | None = None):
    """The runtime model of an export folder alone (:class:`OnnxDDP` or
    :class:`OnnxSegmentor`); see :func:`load_runtime`."""
    return load_runtime(folder, threads, providers)[0]
