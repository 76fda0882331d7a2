"""``densediff export``: a checkpoint as ONNX graphs plus ``deploy.json``, for
:mod:`densediff.deploy.runtime` (onnxruntime, no checkpoint and no model code needed).

A DDP model becomes two graphs, the split the sampler needs (the encoder runs once, the map
decoder once per step):

- ``encoder.onnx``: ``image`` (B x 3 x H x W, normalised) -> ``features`` (B x C x h x w):
  encoder + neck (``model.extract``);
- ``step.onnx``: ``features``, ``x_t`` (B x C_map x h x w), ``log_snr`` (B)
  [, ``x0_prev`` with ``diffusion.self_condition``] -> ``pred`` and ``x0``: one sampling step,
  ``model.denoise_step`` (the map decoder's prediction: segmentation K class logits, depth
  the depth in metres; and its re-encoding as the x0 estimate the sampler needs). A decoder
  that never reads the time has no ``log_snr`` input.

A discriminative model (the twin / baseline segmentor, the depth twin) becomes the same
``encoder.onnx`` and ``head.onnx``: ``features`` -> ``pred``, its one call on the feature grid
(class logits, or depth in metres): together the whole network, split where ``bench`` times
it.

``deploy.json`` records what the runtime needs besides the graphs: the ``output_kind``, each
graph's ``inputs`` (names, in order), for DDP ``map_channels`` and the ``sampler`` settings
it samples with, and the stored config.

The sampler itself (noise, seeds, DDIM/DDPM updates) is not in a graph: the runtime runs the
library's own loop (:func:`densediff.diffusion.samplers.sample_map`) around ``step.onnx``.

The batch axis is dynamic; H and W are fixed at export (``size``, default
:func:`default_input_size`). Graphs are traced with the TorchScript exporter
(``dynamo=False``): the torch.export-based one stops at a ``.tolist()`` in the deformable
attention; while exporting, the attention samples with ``grid_sample`` (ONNX GridSample).

``quantize="int8"`` (``densediff export --quantize int8``) rewrites each graph with
onnxruntime's dynamic quantisation of its linear layers (``MatMul`` / ``Gemm``: int8 weights,
per-tensor; activations quantised per call), the convolutions and everything else stay fp32;
``deploy.json`` records ``"quantize": "int8"`` and ``check`` then holds the int8 graphs'
differences to fp32 PyTorch. Speed and accuracy: ``benchmarks/RESULTS.md`` section 14h.

BEV models (calibrated multi-camera input, a ``bev_pool`` scatter) and DDPS (a discrete
sampler around a frozen base segmentor) are refused: see :data:`SUPPORTED`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from densediff.errors import UserError, one_line
from densediff.utils.checks import check_size
from densediff.utils.fs import atomic_write

__all__ = ["DEPLOY_FILE", "FORMAT", "FORMAT_VERSION", "QUANTIZE", "SUPPORTED",
           "default_input_size", "export", "export_model", "session_options"]

QUANTIZE = ("int8",)
"""The ``quantize`` modes of :func:`export` (None: fp32 graphs)."""

FORMAT = "densediff-onnx"
"""The ``format`` entry of ``deploy.json``."""
FORMAT_VERSION = 1
"""The ``format_version`` entry of ``deploy.json``; the runtime reads this version only."""
DEPLOY_FILE = "deploy.json"
SUPPORTED = ("segmentation and depth models: DDP (model.type ddp) and the discriminative "
             "twins / baselines (model.type segmentor)")
"""What :func:`export` takes (for messages)."""
ONNX_HINT = 'pip install "densediff[onnx]"'

_TRACE_BATCH = 2
"""Batch size of the tracing inputs (2, not 1: nothing may specialise on a batch of one)."""


class _Encoder(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.extract(image)


class _Step(nn.Module):
    """One sampling step of a DDP model (``DDP.denoise_step``): the decoder's prediction and
    its re-encoding as the x0 estimate."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor, x_t: torch.Tensor, log_snr: torch.Tensor,
                x0_prev: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.denoise_step(features, x_t, log_snr, x0_prev)


class _Head(nn.Module):
    """A discriminative model's one call: features -> its output on the feature grid (the one
    step of ``sample_steps(features, 0)``: class logits, or depth in metres)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.sample_steps(features, 0).steps[0][:, 0]


def default_input_size(cfg) -> tuple[int, int]:
    """The image size (H, W) the graphs are exported at by default: the sliding window
    (``eval.crop_size``) with ``eval.mode: slide``; else, with ``data.test_scale``, the size
    the test resize gives a landscape image of that aspect ratio (CamVid 360 x 480,
    Cityscapes 1024 x 2048); else the size ``bench`` uses (the training crop, or 512 x 512)."""
    from densediff.tasks import spec_for

    if cfg.eval.mode == "slide" and cfg.eval.crop_size is not None:
        return tuple(int(v) for v in cfg.eval.crop_size)
    if cfg.data.test_scale is not None:
        return min(cfg.data.test_scale), max(cfg.data.test_scale)
    _, size = spec_for(cfg).pipeline.example_input(cfg, None, 1, torch.device("cpu"))
    return size


def _check_out(out: Path, overwrite: bool, what: str) -> None:
    """UserError when ``out`` holds anything (unless ``overwrite``) or cannot be written."""
    from densediff.utils.fs import check_writable_dir

    if out.is_dir() and not overwrite:
        try:
            busy = any(out.iterdir())
        except OSError as e:
            raise UserError(f"{what}: cannot list {out} ({e.strerror or one_line(e)})") from None
        if busy:
            raise UserError(f"{what}: {out} exists and is not empty; choose a new folder or "
                            "pass --overwrite")
    check_writable_dir(out, what)


def _refuse(cfg, checkpoint) -> None:
    """UserError for the models export does not take (see :data:`SUPPORTED`)."""
    from densediff.tasks import spec_for

    refusal = spec_for(cfg).export_refusal
    if refusal:
        raise UserError(f"{checkpoint}: {refusal}; export takes {SUPPORTED}")
    if cfg.model.type == "ddps":
        raise UserError(f"{checkpoint}: a DDPS model cannot be exported (its discrete sampler "
                        f"runs around a frozen base segmentor); export takes {SUPPORTED}")


def _onnx_export(module: nn.Module, args: tuple, path: Path, names_in: list[str],
                 names_out: list[str], opset: int) -> None:
    axes = {n: {0: "batch"} for n in names_in + names_out}

    def write(tmp: Path) -> None:
        try:
            with warnings.catch_warnings():
                # the legacy exporter's deprecation notice; tracer notes on shapes that become
                # constants (H and W are fixed by design)
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                torch.onnx.export(module.eval(), args, str(tmp), dynamo=False,
                                  opset_version=opset, input_names=names_in,
                                  output_names=names_out, dynamic_axes=axes,
                                  do_constant_folding=True)
        except torch.onnx.errors.OnnxExporterError as e:
            raise UserError(f"export: {path.name} could not be exported ({one_line(e)})"
                            ) from None
    atomic_write(path, write, what="export")  # a failed write: one line naming the file


def _check(path: Path, feeds: dict, expected: list[torch.Tensor]) -> float:
    """Max abs difference between onnxruntime's outputs of ``path`` and ``expected``."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), session_options(ort), providers=["CPUExecutionProvider"])
    taken = {i.name for i in sess.get_inputs()}  # a decoder without time drops log_snr
    got = sess.run(None, {k: v.detach().float().cpu().numpy() for k, v in feeds.items()
                          if k in taken})
    return max(float((torch.from_numpy(g) - e.float().cpu()).abs().max())
               for g, e in zip(got, expected))


def session_options(ort, threads: int | None = None):
    """The onnxruntime settings of every graph, set deliberately rather than left to the
    defaults: all graph optimisations (fusions, layout changes); one graph at a time
    (sequential, one inter-op thread) with ``threads`` intra-op threads (None: torch's
    count); and no spin-waiting of idle intra-op threads, so that they do not take the cores
    from the Python loop, PyTorch or other processes between and after calls (on a shared
    2-core machine spinning measured slower: benchmarks/RESULTS.md section 14h)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def _need_onnx():
    try:
        import onnx
    except ImportError:
        raise UserError(f"export needs the onnx package: {ONNX_HINT}") from None
    return onnx


def export(checkpoint: str | os.PathLike, out: str | os.PathLike,
           size: tuple[int, int] | None = None, opset: int = 17, overwrite: bool = False,
           what: str = "--out", quantize: str | None = None) -> dict:
    """Export ``checkpoint`` into the folder ``out`` (see the module doc); returns the
    ``deploy.json`` contents (:func:`export_model`).

    Args:
        checkpoint: a ``.safetensors`` checkpoint, a run folder or an official DDP checkpoint
            (``.pth`` / ``hf://``) of a supported model (:data:`SUPPORTED`).
        out: the export folder; it must not exist or be empty, unless ``overwrite``.
        size: the (H, W) input size of the graphs; None: :func:`default_input_size`.
        opset: the ONNX opset, 16 (GridSample) to the newest the TorchScript exporter writes.
        overwrite: write into a non-empty ``out`` (files of the same name are replaced).
        what: how messages name ``out``.
        quantize: None (fp32 graphs) or ``"int8"`` (see the module doc).
    """
    from densediff.api import load_model
    from densediff.official import is_official_source
    from densediff.tasks import config_from_dict
    from densediff.utils.checkpoint import load_metadata, resolve_weights

    _check_options(size, opset, quantize)
    _need_onnx()
    _check_out(Path(out), overwrite, what)
    if is_official_source(checkpoint):  # an official .pth / hf:// file: converted in memory
        model, cfg, _, _ = load_model(checkpoint)
        stored = cfg.to_dict()
        _refuse(cfg, checkpoint)
    else:
        if Path(checkpoint).is_dir():  # a run folder: its checkpoints/best, else last
            checkpoint = resolve_weights(checkpoint, "checkpoint")
        stored = load_metadata(checkpoint)["config"]  # CheckpointError: missing, not densediff
        _refuse(config_from_dict(stored, source=str(checkpoint)), checkpoint)  # before building
        model, cfg, _, _ = load_model(checkpoint)
    return export_model(model, cfg, out, size=size, opset=opset, overwrite=True, what=what,
                        config=stored, source=Path(checkpoint).name, quantize=quantize)


def _max_opset() -> int:
    """The newest opset torch's TorchScript exporter writes."""
    try:
        from torch.onnx import _constants

        return int(_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    except (ImportError, AttributeError):  # pragma: no cover - another torch layout
        return 20


def _check_options(size, opset: int, quantize: str | None = None) -> None:
    if quantize is not None and quantize not in QUANTIZE:
        raise UserError(f"--quantize: expected {', '.join(QUANTIZE)}, got {quantize!r}")
    top = _max_opset()
    if not 16 <= opset <= top:
        raise UserError(f"--opset: must be between 16 (GridSample, the deformable attention) "
                        f"and {top} (the newest the TorchScript exporter writes), got {opset}")
    if size is not None:
        check_size(list(size), "--size")


@torch.no_grad()
def export_model(model: nn.Module, cfg, out: str | os.PathLike,
                 size: tuple[int, int] | None = None, opset: int = 17, overwrite: bool = False,
                 what: str = "out", config: dict | None = None, source: str | None = None,
                 quantize: str | None = None) -> dict:
    """Export a built model (``cfg``: its config) into the folder ``out``; returns the
    ``deploy.json`` contents. :func:`export` does this for a checkpoint; ``bench`` for a model
    with random weights.

    Args:
        model: a supported model (:data:`SUPPORTED`), on any device; it is left in eval mode.
        cfg: its :class:`~densediff.config.Config`.
        out, size, opset, overwrite, what: as :func:`export`.
        config: the config dict stored in ``deploy.json`` (the runtime rebuilds the task
            pipeline, classes and preprocessing from it); None: ``cfg.to_dict()``.
        source: where the weights came from (stored as ``source``).
        quantize: None or ``"int8"`` (the module doc; needs onnxruntime).

    With onnxruntime installed, each graph is run once on the tracing inputs and the largest
    difference to PyTorch is stored under ``check`` (None without onnxruntime).
    """
    from densediff.pipelines import is_diffusion
    from densediff.tasks import class_info

    out = Path(out)
    _check_options(size, opset, quantize)
    onnx = _need_onnx()
    if quantize is not None:
        _need_quantization()
    _refuse(cfg, source or "the model")
    _check_out(out, overwrite, what)
    model.eval()
    names, _ = class_info(cfg)
    h, w = check_size([int(v) for v in (size or default_input_size(cfg))],
                      "export input size" if size is None else "--size")
    (out / DEPLOY_FILE).unlink(missing_ok=True)  # written last: marks a complete export

    gen = torch.Generator().manual_seed(0)
    image = torch.randn(_TRACE_BATCH, 3, h, w, generator=gen).to(next(model.parameters()).device)
    check = _new_check()
    [feat] = _export_graph(_Encoder(model), {"image": image}, ["features"],
                           out / "encoder.onnx", opset, check, "features_max_abs_diff", quantize)
    graphs = (_export_step(model, feat, gen, out, opset, check, quantize) if is_diffusion(model)
              else _export_head(model, feat, out, opset, check, quantize))
    meta = {**_describe(model, cfg, source, opset, (h, w), feat, names), **graphs,
            "inputs": _graph_inputs(onnx, out, graphs["graphs"])}
    if quantize is not None:
        meta["quantize"] = quantize
    meta["check"] = check if check is None else {  # strict JSON: NaN/inf are not numbers
        k: (v if math.isfinite(v) else None) for k, v in check.items()}
    meta["config"] = config if config is not None else cfg.to_dict()
    text = json.dumps(meta, indent=1)
    atomic_write(out / DEPLOY_FILE, lambda tmp: tmp.write_text(text), what="export")
    return meta


def _graph_inputs(onnx, out: Path, graphs: dict[str, str]) -> dict[str, list[str]]:
    """Each written graph checked by ``onnx.checker``; its input names, in order (the
    exporter leaves out inputs the graph never reads)."""
    inputs = {}
    for graph, name in graphs.items():
        onnx.checker.check_model(str(out / name))
        model = onnx.load(str(out / name), load_external_data=False)
        inputs[graph] = [i.name for i in model.graph.input]
    return inputs


def _new_check() -> dict | None:
    """The ``check`` entries to fill: {} with onnxruntime installed, else None (no checks)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    return {}


def _need_quantization():
    try:
        from onnxruntime import quantization
    except ImportError:
        raise UserError(f"--quantize needs onnxruntime: {ONNX_HINT}") from None
    return quantization


def _quantize_int8(path: Path) -> None:
    """``path`` rewritten in place with onnxruntime's dynamic int8 quantisation of its linear
    layers (MatMul / Gemm; int8 weights; activations quantised per call)."""
    q = _need_quantization()

    def write(tmp: Path) -> None:
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # its advice to pre-process (shape inference) first
        try:
            q.quantize_dynamic(str(path), str(tmp), weight_type=q.QuantType.QInt8,
                               op_types_to_quantize=["MatMul", "Gemm"])
        finally:
            root.setLevel(level)
    atomic_write(path, write, what="export")


def _export_graph(module: nn.Module, inputs: dict[str, torch.Tensor], outputs: list[str],
                  path: Path, opset: int, check: dict | None, check_key: str,
                  quantize: str | None = None) -> list[torch.Tensor]:
    """``module`` on ``inputs`` (named as the graph's inputs) as the graph ``path`` (int8:
    then quantised); returns its PyTorch outputs. With ``check`` (not None) the largest
    difference of onnxruntime's outputs is stored under ``check_key``."""
    expected = module(*inputs.values())
    expected = list(expected) if isinstance(expected, tuple) else [expected]
    _onnx_export(module, tuple(inputs.values()), path, list(inputs), outputs, opset)
    if quantize == "int8":
        _quantize_int8(path)
    if check is not None:
        check[check_key] = _check(path, inputs, expected)
    return expected


def _export_step(model: nn.Module, feat: torch.Tensor, gen: torch.Generator, out: Path,
                 opset: int, check: dict | None, quantize: str | None = None) -> dict:
    """``step.onnx`` (one sampling step, ``DDP.denoise_step``); the ``deploy.json`` entries
    of a DDP model: its graphs, ``map_channels`` and the ``sampler`` settings the runtime
    samples with."""
    d, channels = model.diffusion_cfg, model.map_channels
    x_t = torch.randn(_TRACE_BATCH, channels, *feat.shape[-2:], generator=gen).to(feat.device)
    log_snr = model.schedule(torch.tensor([0.3, 0.8], device=feat.device))
    step_in = {"features": feat, "x_t": x_t, "log_snr": log_snr}
    if d.self_condition:
        step_in["x0_prev"] = model.denoise_step(feat, x_t, log_snr)[1]
    _export_graph(_Step(model), step_in, ["pred", "x0"], out / "step.onnx", opset, check,
                  "step_max_abs_diff", quantize)
    return {"graphs": {"encoder": "encoder.onnx", "step": "step.onnx"}, "map_channels": channels,
            "sampler": {"schedule": d.schedule, "steps": d.steps, "td": d.td,
                        "sampler": d.sampler, "randsteps": d.randsteps,
                        "accumulation": d.accumulation, "sample_start": d.sample_start,
                        "self_condition": d.self_condition, "time_input": d.time_input,
                        "precondition": d.precondition}}


def _export_head(model: nn.Module, feat: torch.Tensor, out: Path, opset: int,
                 check: dict | None, quantize: str | None = None) -> dict:
    """``head.onnx`` (a discriminative model's one call); its ``deploy.json`` entries."""
    _export_graph(_Head(model), {"features": feat}, ["pred"], out / "head.onnx", opset, check,
                  "head_max_abs_diff", quantize)
    return {"graphs": {"encoder": "encoder.onnx", "head": "head.onnx"}}


def _describe(model: nn.Module, cfg, source: str | None, opset: int, size: tuple[int, int],
              feat: torch.Tensor, names: list[str]) -> dict:
    """The ``deploy.json`` entries every export has."""
    from densediff import __version__
    from densediff.pipelines import is_diffusion

    return {"format": FORMAT, "format_version": FORMAT_VERSION,
            "densediff_version": __version__, "source": source,
            "task": cfg.task, "model_type": cfg.model.type,
            "kind": "ddp" if is_diffusion(model) else "discriminative",
            "output_kind": model.output_kind, "opset": opset, "input_size": list(size),
            "dynamic_batch": True, "feature_grid": list(feat.shape[-2:]),
            "feature_channels": int(feat.shape[1]), "classes": names}
