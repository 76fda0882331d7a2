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

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from densediff.deploy.export import DEPLOY_FILE, FORMAT, FORMAT_VERSION, ONNX_HINT
from densediff.errors import UserError, one_line

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
        ort = _onnxruntime()
        if not path.is_file():
            raise UserError(f"{path}: missing (the export folder is incomplete; export again)")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        try:
            self.sess = ort.InferenceSession(str(path), opts,
                                             providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own error types (Fail, InvalidGraph...)
            raise UserError(f"{path}: onnxruntime cannot load it ({one_line(e)})") from None
        self.inputs = [i.name for i in self.sess.get_inputs()]

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        feeds = {n: a.detach().cpu().float().contiguous().numpy()
                 for n, a in zip(self.inputs, args)}
        return [torch.from_numpy(np.asarray(o)) for o in self.sess.run(None, feeds)]


class _OnnxModel:
    """What the runtime models share: ``encoder.onnx`` behind ``extract``, the fixed input
    size, and the ``to`` / ``eval`` calls :class:`~densediff.api.Predictor` makes."""

    def __init__(self, folder: Path, meta: dict, cfg, threads: int | None,
                 providers: list[str] | None):
        self.meta = meta
        self.cfg = cfg
        self.task = meta["task"]
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
        from densediff.models.ddp import Trajectory
        from densediff.models.depth import DepthTrajectory

        super().__init__(folder, meta, cfg, threads, providers)
        self.step = _Session(folder / meta["graphs"]["step"], threads, providers)
        self.diffusion_cfg = cfg.model.diffusion
        self.schedule = get_schedule(self.diffusion_cfg.schedule)
        self.map_channels = int(meta["map_channels"])
        self.trajectory_cls = DepthTrajectory if self.task == "depth" else Trajectory

    default_steps = property(lambda self: self.diffusion_cfg.steps)
    accumulation = property(lambda self: self.diffusion_cfg.accumulation)

    def denoise_step(self, feat: torch.Tensor, x_t: torch.Tensor, log_snr: torch.Tensor,
                     x0_prev: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One ``step.onnx`` call: the decoder's prediction and its re-encoded x0."""
        args = [feat, x_t, log_snr]
        if self.diffusion_cfg.self_condition:  # as DDP.denoise: no estimate yet = zeros
            args.append(torch.zeros_like(x_t) if x0_prev is None else x0_prev)
        pred, x0 = self.step(*args)
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
        return self.trajectory_cls(preds)

    def _sample(self, img, steps, **kwargs):
        return self.sample_steps(self.extract(img), self.default_steps if steps is None
                                 else steps, **kwargs)

    def predict_logits(self, img: torch.Tensor, steps: int | None = None,
                       accumulation: bool | None = None, **kwargs) -> torch.Tensor:
        """As :meth:`densediff.models.DDP.predict_logits`: B x K x H x W scores."""
        if self.task == "depth":
            raise TypeError("a depth model has no class logits: use predict_depth")
        traj = self._sample(img, steps, **kwargs)
        acc = self.accumulation if accumulation is None else accumulation
        return self._up(traj.seg_logit(acc), img.shape[-2:])

    def predict_depth(self, img: torch.Tensor, steps: int | None = None,
                      accumulation: bool | None = None, **kwargs) -> torch.Tensor:
        """As :meth:`densediff.models.DepthDDP.predict_depth`: B x 1 x H x W depth."""
        if self.task != "depth":
            raise TypeError("a segmentation model has no depth: use predict_logits")
        traj = self._sample(img, steps, **kwargs)
        acc = self.accumulation if accumulation is None else accumulation
        return self._up(traj.depth(acc), img.shape[-2:])


class OnnxSegmentor(_OnnxModel):
    """A discriminative model (segmentation or depth) on ``encoder.onnx`` + ``head.onnx``."""

    def __init__(self, folder: Path, meta: dict, cfg, threads: int | None = None,
                 providers: list[str] | None = None):
        super().__init__(folder, meta, cfg, threads, providers)
        self.head_graph = _Session(folder / meta["graphs"]["head"], threads, providers)

    def head(self, feat: torch.Tensor) -> torch.Tensor:
        """The head's output on the feature grid (depth: in metres)."""
        return self.head_graph(feat)[0]

    def predict_logits(self, img: torch.Tensor) -> torch.Tensor:
        """As :meth:`densediff.models.Segmentor.predict_logits`: B x K x H x W logits."""
        if self.task == "depth":
            raise TypeError("a depth model has no class logits: use predict_depth")
        return self._up(self.head(self.extract(img)), img.shape[-2:])

    def predict_depth(self, img: torch.Tensor) -> torch.Tensor:
        """As :meth:`densediff.models.Depther.predict_depth`: B x 1 x H x W depth."""
        if self.task != "depth":
            raise TypeError("a segmentation model has no depth: use predict_logits")
        return self._up(self.head(self.extract(img)), img.shape[-2:])


_REQUIRED = ("task", "kind", "input_size", "graphs", "config")
_GRAPHS = {"ddp": ("encoder", "step"), "discriminative": ("encoder", "head")}


def read_deploy(folder: str | os.PathLike) -> dict:
    """``folder/deploy.json``, checked: UserError naming the folder or file when it is missing,
    not JSON, of another format or version, or lacks an entry."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder (expected a folder written by "
                        "`densediff export`)")
    path = folder / DEPLOY_FILE
    if not path.is_file():
        raise UserError(f"{path}: missing; {folder} is not a (complete) `densediff export` "
                        "folder")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable JSON ({one_line(e)})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path}: not a densediff export description (format is not {FORMAT!r})")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(f"{path}: format_version {version!r} is not supported (this densediff "
                        f"reads version {FORMAT_VERSION}); export the checkpoint again")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise UserError(f"{path}: the entry {missing[0]!r} is missing")
    graphs = _GRAPHS.get(meta["kind"])
    if graphs is None:
        raise UserError(f"{path}: unknown kind {meta['kind']!r} (expected ddp or discriminative)")
    named = meta["graphs"]
    if (not isinstance(named, dict) or not set(graphs) <= set(named)
            or not all(isinstance(named[g], str) and Path(named[g]).name == named[g]
                       and named[g] not in ("", ".", "..") for g in graphs)):
        raise UserError(f"{path}: 'graphs' must name the {' and '.join(graphs)} graph files "
                        "in the folder")
    size = meta["input_size"]
    if not (isinstance(size, list) and len(size) == 2
            and all(isinstance(v, int) and v > 0 for v in size)):
        raise UserError(f"{path}: 'input_size' must be [H, W], got {size!r}")
    return meta


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
    cfg = config_from_dict(meta["config"], source=str(folder / DEPLOY_FILE))
    names, palette = class_info(cfg)
    cls = OnnxDDP if meta["kind"] == "ddp" else OnnxSegmentor
    return cls(folder, meta, cfg, threads, providers), cfg, names, palette


def load_onnx_model(folder: str | os.PathLike, threads: int | None = None,
                    providers: list[str] | None = None):
    """The runtime model of an export folder alone (:class:`OnnxDDP` or
    :class:`OnnxSegmentor`); see :func:`load_runtime`."""
    return load_runtime(folder, threads, providers)[0]
