"""``densediff bench``: where inference time goes (encoder once, decoder per step), per
execution variant, measured interleaved in one process.

DDP's efficiency argument (paper §3.2, Table 5e) is that the encoder runs once and every extra
sampling step only costs one pass of the light map decoder. For a config with random weights
(the weights do not change the cost) this measures, per variant:

- ``encoder``: image encoder + neck, one forward (DDPS: the whole frozen base segmentor; BEV:
  every camera through the encoder and neck, the view transform and the BEV fuser);
- ``decoder_step``: one map-decoder evaluation on precomputed features (DDP: fusion + time
  MLP + decoder; DDPS: the UNet denoiser and classifier, twice with guidance; a segmentor:
  its head);
- ``total[n]``: a whole prediction with ``n`` steps (encoder, ``n`` decoder steps and the
  sampler's updates, upsampling to the input size);
- ``extra_step_ratio`` r = (total[3] - total[1]) / (2 total[1]): the relative cost of each
  step beyond the first (on a CPU it is bounded by the FLOPs: decoder / (decoder + encoder));
- ``step_gflops``: the decoder step's matmul/conv FLOPs (counted once with torch's
  ``FlopCounterMode``) per second, and ``floor_fraction``: that rate over a plain matmul of
  the variant's precision timed in the same rounds (``matmul_gflops``; shape
  ``matmul_shape``: tokens x channels @ channels x FFN channels, the decoder's largest);
- ``speedup``: the median over rounds of (eager time / variant time) of the same round;
- ``step_minor_faults``: minor page faults of the process during one timed decoder step
  (median; what the malloc settings of :mod:`densediff.utils.alloc` remove);
- ``peak_memory_MiB``: CUDA ``max_memory_allocated``, or on Linux the rise of the process's
  peak resident set during one prediction at the largest batch, in a pass of its own per
  variant after the free heap is given back (``VmHWM`` reset before the pass, and a 1 ms
  sampler of the resident set: the larger); ``predict_minor_faults``: the faults of that pass.
  Both counters are checked once against a phase known to fault
  (:func:`densediff.utils.memstat.probe`); one that does not see it reads None ("n/a"),
  never 0;
- ``cpu``, ``cpu_flags``, ``bf16_hardware``: the CPU of the run (the bf16 floor of a CPU
  without bf16 hardware is reported as emulated);
- ``throughput``: images per second of whole predictions (``steps`` = the model's default)
  at each batch size of ``batches`` (median over ``max(1, repeats // 3)`` rounds).

Variants (``variants``):

- ``eager``: today's reference path: fp32, the ``grid_sample`` deformable attention, glibc
  malloc with its default behaviour;
- ``fast``: the defaults of ``densediff`` processes (gather deformable attention at
  inference, the no-mmap malloc of :mod:`densediff.utils.alloc`) in ``precision`` (``auto``:
  bf16 where the hardware has it);
- ``compiled``: ``fast`` with the map decoder under ``torch.compile``; its compile time
  (the first call) is reported as ``compile_s``;
- ``onnx``: the model exported with :mod:`densediff.deploy` and run on onnxruntime (CPU),
  fp32 (needs the ``onnx`` extra; DDP segmentation/depth only);
- ``onnx-int8``: the same export with ``quantize="int8"`` (dynamic int8 linear layers).

Timing: ``warmup`` untimed rounds, then ``repeats`` rounds; in every round each measurement
is taken once per variant, the variants in a rotating order, so a busy period slows all of
them alike. Each number is the median over rounds with its min-max spread; a measurement
whose spread exceeds :data:`NOISY_SPREAD` of its median flags the run ``noisy``. Compare
variants as the reported ratios; absolute CPU times mean little.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from densediff.config import Config
from densediff.errors import UserError
from densediff.limits import BENCH_MAX_BATCH as MAX_BATCH
from densediff.limits import BENCH_MAX_REPEATS as MAX_REPEATS
from densediff.models import DDP

__all__ = ["MAX_BATCH", "MAX_REPEATS", "NOISY_SPREAD", "VARIANTS", "bench", "format_bench"]

VARIANTS = ("eager", "fast", "compiled", "onnx", "onnx-int8")
DEFAULT_VARIANTS = ("eager", "fast", "onnx")
NOISY_SPREAD = 0.15
"""(max - min) / median over rounds above which a measurement is flagged noisy."""
_DEFAULT_STEPS = (1, 3, 5)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _minor_faults() -> int | None:
    """Minor page faults of this process so far; None where the counter is missing or does
    not count (checked against a known-faulting probe: :mod:`densediff.utils.memstat`)."""
    from densediff.utils import memstat

    return memstat.minor_faults() if memstat.probe()["faults"] else None


# ------------------------------------------------------------------------------------------
# options and setup


def _check_options(size: Sequence[int] | None, batch: int, repeats: int, warmup: int,
                   variants: Sequence[str] | None, batches: Sequence[int] | None,
                   precision: str | None) -> tuple[list[str], list[int]]:
    """The variants to run (in the order given, each once) and the sorted, distinct batch
    sizes of the throughput measurement (None or empty: ``[batch]``). One UserError line
    naming the option for a size, count or variant out of range, or a ``precision`` that no
    asked variant uses."""
    from densediff.utils.checks import check_int, check_size

    if size is not None:
        check_size(list(size), "--size")
    check_int(batch, "--batch", 1, MAX_BATCH)
    check_int(repeats, "--repeats", 1, MAX_REPEATS)
    check_int(warmup, "warmup", 0, MAX_REPEATS)
    asked = list(dict.fromkeys(variants if variants is not None else DEFAULT_VARIANTS))
    bad = [v for v in asked if v not in VARIANTS]
    if bad or not asked:
        raise UserError(f"--variants: unknown variant {bad[0] if bad else '(none)'}; "
                        f"choose from {', '.join(VARIANTS)}")
    if precision is not None and not {"fast", "compiled"} & set(asked):
        raise UserError("--precision: applies to the fast and compiled variants, and --variants "
                        f"{','.join(asked)!r} has neither")
    sizes = {check_int(b, "--batches", 1, MAX_BATCH) for b in (batches or [batch])}
    return asked, sorted(sizes)


def _step_counts(cfg: Config, model: torch.nn.Module, steps: Sequence[int] | None,
                 diffusion: bool) -> list[int]:
    """The whole-prediction step counts to time: ``steps`` checked against the model's range,
    or (None) those of 1, 3, 5 the model can take; ``[1]`` for a model without steps
    (UserError if ``steps`` were given for it)."""
    from densediff.pipelines import check_steps

    if not diffusion:
        if steps is not None:
            raise UserError("--steps: applies to diffusion models; this config's model "
                            f"({cfg.model.type}) takes no step count")
        return [1]
    if steps is None:
        top = model.max_steps or max(_DEFAULT_STEPS)
        steps = [n for n in _DEFAULT_STEPS if model.min_steps <= n <= top]
    check_steps(model, list(steps), "the model", "--steps")
    return list(steps)


@dataclass
class _Setup:
    """What every measurement of one run shares: the eager model (random weights), its task
    pipeline, the example input at ``batch`` (BEV: every camera image at ``hw``) and the
    options."""

    cfg: Config
    dev: torch.device
    model: torch.nn.Module
    pipe: Any
    diffusion: bool
    img: Any
    hw: tuple[int, int]
    steps: list[int]
    batch: int
    batches: list[int]
    size: tuple[int, int] | None
    repeats: int
    warmup: int

    def step_call(self, v: _Variant) -> Callable[[], object]:
        """One map-decoder evaluation of ``v`` on its features (a segmentor: its head)."""
        f = v.feats
        if self.diffusion:
            return lambda: v.model.decoder_step(f)
        return lambda: v.model.head(f)

    def predict_call(self, v: _Variant, x: Any, n: int) -> Callable[[], object]:
        """A whole prediction of ``v`` on ``x`` with ``n`` steps (no step count: one pass), as
        ``predict`` runs a batch: with :func:`~densediff.utils.batching.batch_invariant`."""
        from densediff.utils.batching import batch_invariant

        fn = v.model.predict_map
        batch = len(next(iter(x.values())) if isinstance(x, dict) else x)

        def call():
            with batch_invariant(v.model, batch):
                return fn(x, steps=n) if self.diffusion else fn(x)
        return call

    def default_steps(self) -> int:
        """The step count of the throughput and memory measurements: the model's default
        where it is among ``steps``, else the last of ``steps`` (1 without steps)."""
        if not self.diffusion:
            return 1
        n = self.model.default_steps
        return n if n in self.steps else self.steps[-1]


def _setup(cfg: Config, size: tuple[int, int] | None, batch: int, steps: Sequence[int] | None,
           dev: torch.device, batches: list[int], repeats: int, warmup: int) -> _Setup:
    """``cfg``'s model built with random weights on ``dev`` (the weights do not change the
    cost), its pipeline, an example input and the step counts to time."""
    from densediff.pipelines import is_diffusion
    from densediff.tasks import build_model, class_info, spec_for

    names, _ = class_info(cfg)
    model = build_model(cfg, len(names)).to(dev).eval()
    pipe = spec_for(cfg).pipeline
    diffusion = is_diffusion(model)
    img, hw = pipe.example_input(cfg, size, batch, dev)  # BEV: size sets each camera image
    return _Setup(cfg, dev, model, pipe, diffusion, img, hw,
                  _step_counts(cfg, model, steps, diffusion), batch, batches, size, repeats,
                  warmup)


# ------------------------------------------------------------------------------------------
# variants


@dataclass
class _Variant:
    """One execution variant: its model (or onnxruntime stand-in), the precision, deformable
    attention core and malloc settings of its calls, and its features of the example input
    (set before timing)."""

    name: str
    model: Any
    precision: str
    msda: str
    fast_malloc: bool
    compile_s: float | None = None
    feats: Any = None

    @contextlib.contextmanager
    def active(self, device: torch.device) -> Iterator[None]:
        """The variant's malloc settings, attention core and autocast, for one call."""
        from densediff.decoders.msda import msda_impl
        from densediff.utils.alloc import set_glibc_fast
        from densediff.utils.precision import autocast

        set_glibc_fast(self.fast_malloc)
        with msda_impl(self.msda), autocast(self.precision, device):
            yield

    def labels(self) -> dict[str, str]:
        """The report's ``precision``, ``msda`` and ``malloc`` of this variant."""
        if self.name.startswith("onnx"):
            return {"precision": "int8 linear" if self.name == "onnx-int8" else "fp32",
                    "msda": "GridSample", "malloc": "onnxruntime arena"}
        return {"precision": self.precision, "msda": self.msda,
                "malloc": "no-mmap" if self.fast_malloc else "glibc default"}


def _with_decoder(model: torch.nn.Module, decoder: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy of ``model`` that shares all its parameters and submodules but calls
    ``decoder`` as its map decoder; ``model`` itself is left unchanged."""
    clone = copy.copy(model)
    clone._modules = dict(model._modules)  # its own table of submodules, the same modules
    clone.decoder = decoder
    return clone


def _onnx_model(model, cfg: Config, size: tuple[int, int], tmp: Path,
                quantize: str | None = None):
    """The model exported to ``tmp`` and loaded on onnxruntime (the ``onnx`` variants)."""
    from densediff.deploy import export_model, load_onnx_model

    out = tmp / f"onnx-{quantize or 'fp32'}"
    export_model(model, cfg, out, size=size, quantize=quantize)
    return load_onnx_model(out)


def _build_variants(s: _Setup, asked: list[str], fast_precision: str, tmp: Path,
                    notes: list[str]) -> list[_Variant]:
    """The ``asked`` variants that apply to the model, in that order; each one skipped gets a
    line in ``notes``. UserError when none applies."""
    runs = []
    for name in asked:
        if name == "eager":
            runs.append(_Variant(name, s.model, "fp32", "grid_sample", False))
        elif name == "fast":
            runs.append(_Variant(name, s.model, fast_precision, "auto", True))
        elif name == "compiled" and not isinstance(s.model, DDP):
            notes.append("compiled: skipped (the model has no map decoder to compile)")
        elif name == "compiled":
            compiled = _with_decoder(s.model, torch.compile(s.model.decoder))
            runs.append(_Variant(name, compiled, fast_precision, "auto", True))
        elif name in ("onnx", "onnx-int8"):
            q = "int8" if name == "onnx-int8" else None
            try:
                runs.append(_Variant(name, _onnx_model(s.model, s.cfg, s.hw, tmp, q), "fp32",
                                     "auto", True))
            except UserError as e:  # not installed, or a model the exporter refuses
                notes.append(f"{name}: skipped ({e})")
    if not runs:
        raise UserError(f"--variants: none of {','.join(asked)} applies ({'; '.join(notes)})")
    if "eager" not in asked:
        notes.append("speedup: relative to the first variant (eager was not run)")
    return runs


# ------------------------------------------------------------------------------------------
# timing rounds


def _rounds(order: list, warmup: int, repeats: int) -> Iterator[tuple[bool, list]]:
    """``warmup + repeats`` rounds: per round, whether it is timed (the first ``warmup`` are
    not) and ``order`` rotated left by the round's index, so that each item takes each place
    in turn and a busy period slows all of them alike."""
    for rnd in range(warmup + repeats):
        k = rnd % len(order)
        yield rnd >= warmup, order[k:] + order[:k]


def _measures(s: _Setup) -> list[tuple[str, Callable[[_Variant], Callable[[], object]]]]:
    """The latency measurements, by name, each as a maker of a variant's call: ``encoder``,
    ``decoder_step`` and ``total<n>`` for each step count n."""
    return [("encoder", lambda v: (lambda: v.model.extract(s.img))),
            ("decoder_step", s.step_call)] + [
        (f"total{n}", lambda v, n=n: s.predict_call(v, s.img, n)) for n in s.steps]


def _floor_matmuls(s: _Setup, tokens: int) -> tuple[list[int], dict[str, tuple]]:
    """The shape ``[m, k, n]`` of the floor matmul and its fp32 and bf16 operands: the map
    decoder's largest matmul (its FFN's first linear: tokens x channels @ channels x
    ffn_channels, over the batch), at least 256 x 256 x 1024."""
    head = s.cfg.model.head
    m = max(tokens * s.batch, 256)
    k, n = max(head.channels, 256), max(getattr(head, "ffn_channels", 0) or 0, 1024)
    mats = {p: (torch.randn(m, k, device=s.dev, dtype=dt),
                torch.randn(k, n, device=s.dev, dtype=dt))
            for p, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    return [m, k, n], mats


def _timing_rounds(s: _Setup, runs: list[_Variant], mats: dict[str, tuple]):
    """The latency rounds (:func:`_rounds`): in each, the floor matmuls once per precision,
    then each measurement of :func:`_measures` once per variant, the variants in the round's
    order. Returns, over the timed rounds, the seconds per variant and measurement, the minor
    page faults of each decoder step per variant, and the matmul seconds per precision."""
    measures = _measures(s)
    times: dict[str, dict[str, list[float]]] = {v.name: {m: [] for m, _ in measures}
                                                 for v in runs}
    faults: dict[str, list[int]] = {v.name: [] for v in runs}
    mm: dict[str, list[float]] = {p: [] for p in mats}
    for timed, rot in _rounds(runs, s.warmup, s.repeats):
        for p, (a, b) in mats.items():
            t = _timed(lambda a=a, b=b: a @ b, s.dev)
            if timed:
                mm[p].append(t)
        for m, make in measures:
            for v in rot:
                with v.active(s.dev):
                    f0 = _minor_faults()
                    t = _timed(make(v), s.dev)
                    f1 = _minor_faults()
                if timed:
                    times[v.name][m].append(t)
                    if m == "decoder_step" and f0 is not None and f1 is not None:
                        faults[v.name].append(f1 - f0)
    return times, faults, mm


def _step_flops(s: _Setup, feats: Any, notes: list[str]) -> int | None:
    """Matmul/conv FLOPs of one decoder step (a segmentor: its head) of the eager fp32 model
    on ``feats``, counted with torch's ``FlopCounterMode``; None, with a note, where the
    counter cannot trace the model."""
    try:
        from torch.utils.flop_counter import FlopCounterMode

        from densediff.decoders.msda import msda_impl

        counter = FlopCounterMode(display=False)
        with counter, msda_impl("grid_sample"):  # eager fp32, the reference path
            (s.model.decoder_step(feats) if s.diffusion else s.model.head(feats))
        return counter.get_total_flops()
    except Exception as e:  # noqa: BLE001 (a model the counter cannot trace: no rate)
        notes.append(f"FLOP count unavailable ({type(e).__name__})")
        return None


# ------------------------------------------------------------------------------------------
# throughput and memory


def _throughput(s: _Setup, runs: list[_Variant], inputs: dict[int, Any],
                n: int) -> dict[str, dict[int, list[float]]]:
    """Images per second of whole ``n``-step predictions per variant and batch size of
    ``inputs``, over ``max(1, repeats // 3)`` timed rounds interleaved as the latencies."""
    thr: dict[str, dict[int, list[float]]] = {v.name: {bs: [] for bs in inputs} for v in runs}
    for timed, rot in _rounds(runs, s.warmup, max(1, s.repeats // 3)):
        for bs, x in inputs.items():
            for v in rot:
                with v.active(s.dev):
                    t = _timed(s.predict_call(v, x, n), s.dev)
                if timed:
                    thr[v.name][bs].append(bs / t)
    return thr


def _peak_memory(s: _Setup, runs: list[_Variant], x: Any,
                 n: int) -> tuple[dict[str, float | None], dict[str, int | None]]:
    """Per variant, one ``n``-step prediction on ``x`` in its own pass: the memory it needs
    (MiB: CUDA ``max_memory_allocated``; on the CPU the rise of the process's peak resident
    set over the pass, the larger of ``VmHWM`` and a 1 ms sampler, after glibc's free heap is
    given back so that memory an earlier variant left resident cannot serve this one) and the
    minor page faults of the pass. None where the counter does not work here (checked
    against a known-faulting probe), never a blind 0."""
    from densediff.utils import memstat

    peaks: dict[str, float | None] = {}
    faults: dict[str, int | None] = {}
    cuda = s.dev.type == "cuda"
    for v in runs:
        if cuda:
            torch.cuda.reset_peak_memory_stats(s.dev)
        memstat.trim_heap()
        with v.active(s.dev), memstat.Phase() as ph:
            s.predict_call(v, x, n)()
        faults[v.name] = ph.faults
        if cuda:
            peaks[v.name] = torch.cuda.max_memory_allocated(s.dev) / 2**20
        else:
            peaks[v.name] = None if ph.peak_rise is None else ph.peak_rise / 2**20
    return peaks, faults


# ------------------------------------------------------------------------------------------
# report


@dataclass
class _Measured:
    """The raw numbers of one run, per variant name: latencies (seconds per measurement and
    round), minor page faults per decoder step, throughputs (images/s per batch size and
    round), peak memory (MiB); and the matmul floor rates and the FLOPs of a decoder step."""

    times: dict[str, dict[str, list[float]]]
    faults: dict[str, list[int]]
    throughput: dict[str, dict[int, list[float]]]
    peaks: dict[str, float | None]
    predict_faults: dict[str, int | None]
    matmul_gflops: dict[str, float]
    step_flops: int | None


def _entry(ts: list[float], ref: list[float]) -> dict[str, float]:
    """One measurement over rounds: median, min and max of ``ts``, and ``speedup``: the median
    over rounds of the reference's time ``ref`` / this time, pairing the same rounds."""
    return {"median": statistics.median(ts), "min": min(ts), "max": max(ts),
            "speedup": statistics.median(a / b for a, b in zip(ref, ts))}


def _is_noisy(ts: list[float]) -> bool:
    """Whether ``ts`` (more than one round) spread by more than :data:`NOISY_SPREAD` of their
    median."""
    med = statistics.median(ts)
    spread = (max(ts) - min(ts)) / med if med > 0 else 0.0
    return spread > NOISY_SPREAD and len(ts) > 1


def _variant_report(v: _Variant, base: str, m: _Measured,
                    diffusion: bool) -> tuple[dict, list[str]]:
    """The report of one variant (speedups relative to the variant ``base``) and the names of
    its noisy measurements (``"<variant> <measurement>"``)."""
    r: dict = v.labels()
    noisy = []
    for name, ts in m.times[v.name].items():
        if _is_noisy(ts):
            noisy.append(f"{v.name} {name}")
        entry = _entry(ts, m.times[base][name])
        if name.startswith("total"):
            r.setdefault("total", {})[int(name[5:])] = entry
        else:
            r[name] = entry
    if 1 in r.get("total", {}) and 3 in r["total"] and diffusion:
        t1, t3 = r["total"][1]["median"], r["total"][3]["median"]
        r["extra_step_ratio"] = (t3 - t1) / (2 * t1)
    if m.step_flops:
        rate = m.step_flops / r["decoder_step"]["median"] / 1e9
        r["step_gflops"] = rate
        r["floor_fraction"] = rate / m.matmul_gflops["bf16" if v.precision == "bf16" else "fp32"]
    fs = m.faults[v.name]
    r["step_minor_faults"] = int(statistics.median(fs)) if fs else None  # None: not counted
    r["predict_minor_faults"] = m.predict_faults.get(v.name)
    r["throughput"] = {bs: statistics.median(x) for bs, x in m.throughput[v.name].items()}
    r["peak_memory_MiB"] = m.peaks[v.name]
    if v.compile_s is not None:
        r["compile_s"] = v.compile_s
    return r, noisy


def _encoder_config(cfg: Config):
    """The encoder config of ``cfg``'s model; DDPS: that of its base segmentor (filled in by
    ``build_model``)."""
    if cfg.model.type == "ddps":
        from densediff.tasks import config_from_dict

        return config_from_dict(cfg.model.ddps.base_config).model.encoder
    return cfg.model.encoder


def _report(s: _Setup, runs: list[_Variant], m: _Measured, notes: list[str], tokens: int,
            matmul_shape: list[int]) -> dict:
    """The result of :func:`bench`: the run's settings, one report per variant, and the first
    variant's latencies and peak memory again at the top level."""
    from densediff.info import count_params
    from densediff.utils import memstat
    from densediff.utils.precision import cpu_has_native_bf16, cpu_model

    base, enc = runs[0].name, _encoder_config(s.cfg)
    out: dict = {"config_model": s.cfg.model.type, "size": list(s.hw), "batch": s.batch,
                 "device": str(s.dev), "threads": torch.get_num_threads(),
                 "repeats": s.repeats, "warmup": s.warmup,
                 "params_M": count_params(s.model) / 1e6, "tokens_per_step": tokens,
                 "variants": {}, "notes": notes, "encoder_name": enc.name,
                 "encoder_variant": enc.variant, "matmul_shape": matmul_shape,
                 "matmul_gflops": m.matmul_gflops,
                 "step_gflop": m.step_flops / 1e9 if m.step_flops else None,
                 "peak_memory_kind": ("cuda max_memory_allocated" if s.dev.type == "cuda" else
                                      "rise of the process peak RSS during the prediction"),
                 "cpu": cpu_model(), "cpu_flags": memstat.cpu_flags(),
                 "bf16_hardware": s.dev.type != "cpu" or cpu_has_native_bf16(),
                 "counters": dict(memstat.probe()),
                 "noisy": []}
    for v in runs:
        out["variants"][v.name], noisy = _variant_report(v, base, m, s.diffusion)
        out["noisy"] += noisy
    out["base_variant"] = base
    first = out["variants"][base]  # at the top level too (the pre-variant report format)
    out["encoder"] = first["encoder"]["median"]
    out["decoder_step"] = first["decoder_step"]["median"]
    out["total"] = {n: e["median"] for n, e in first["total"].items()}
    if "extra_step_ratio" in first:
        out["extra_step_ratio"] = first["extra_step_ratio"]
    out["peak_memory_MiB"] = first["peak_memory_MiB"]
    return out


# ------------------------------------------------------------------------------------------
# the whole run


def _measure(s: _Setup, runs: list[_Variant], notes: list[str]) -> dict:
    """Every measurement of the module doc, in order: features, compile time, FLOPs, latency
    rounds with the matmul floor, throughput, peak memory; then the report."""
    for v in runs:
        with v.active(s.dev):
            v.feats = v.model.extract(s.img)
    feat0 = runs[0].feats
    tokens = int(getattr(feat0, "features", feat0)[0, 0].numel())
    for v in runs:
        if v.name == "compiled":  # its first decoder call compiles
            with v.active(s.dev):
                v.compile_s = _timed(s.step_call(v), s.dev)
    step_flops = _step_flops(s, feat0, notes)
    shape, mats = _floor_matmuls(s, tokens)
    times, faults, mm = _timing_rounds(s, runs, mats)
    flop = 2 * shape[0] * shape[1] * shape[2]
    matmul_gflops = {p: flop / statistics.median(ts) / 1e9 for p, ts in mm.items()}
    n = s.default_steps()
    inputs = {bs: s.pipe.example_input(s.cfg, s.size, bs, s.dev)[0] for bs in s.batches}
    thr = _throughput(s, runs, inputs, n)
    peaks, pfaults = _peak_memory(s, runs, inputs[s.batches[-1]], n)
    measured = _Measured(times, faults, thr, peaks, pfaults, matmul_gflops, step_flops)
    return _report(s, runs, measured, notes, tokens, shape)


@torch.no_grad()
def bench(cfg: Config, size: tuple[int, int] | None = None, batch: int = 1,
          steps: Sequence[int] | None = None, device: str | torch.device = "cpu",
          repeats: int = 10, variants: Sequence[str] | None = None,
          batches: Sequence[int] | None = None, precision: str | None = None,
          warmup: int = 1) -> dict:
    """Latencies (seconds), rates and peak memory of ``cfg``'s model per variant; see the
    module doc. ``size``: the (H, W) input (None: the training crop size, else 512 x 512).
    ``steps``: the whole-prediction step counts (diffusion models; checked against the
    model's range); None: those of 1, 3, 5 the model can take. ``variants``: None: eager,
    fast and (where it applies and onnxruntime is installed) onnx. ``batches``: the batch
    sizes of the throughput measurement (None: just ``batch``). ``precision``: that of the
    fast and compiled variants (None: ``auto``). Bad options: one UserError line naming the
    CLI option, before any work."""
    from densediff.api import resolve_device, resolve_precision_or_fail

    asked, batch_sizes = _check_options(size, batch, repeats, warmup, variants, batches,
                                        precision)
    dev = resolve_device(device, "--device")
    fast_precision = resolve_precision_or_fail(precision or "auto", dev, "--precision")
    s = _setup(cfg, size, batch, steps, dev, batch_sizes, repeats, warmup)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="densediff-bench-") as tmp:
        runs = _build_variants(s, asked, fast_precision, Path(tmp), notes)
        return _measure(s, runs, notes)


def format_bench(r: dict) -> str:
    """The report of :func:`bench` as text: one column per variant."""
    vs = list(r["variants"])
    base = r.get("base_variant", vs[0])
    lines = [f"model {r['config_model']} ({r['encoder_name']} {r['encoder_variant']}), "
             f"{r['params_M']:.2f} M params, input {r['batch']}x3x{r['size'][0]}x{r['size'][1]} "
             f"on {r['device']} ({r['threads']} threads), {r['tokens_per_step']} tokens/step, "
             f"median of {r['repeats']} interleaved rounds [min-max], speedup vs {base}"]
    if r.get("cpu"):
        flags = " ".join(r.get("cpu_flags") or []) or "none of avx2/avx512/vnni/bf16/amx"
        lines.append(f"  cpu: {r['cpu']} (flags: {flags})")
    head = f"  {'':16}" + "".join(f"{v:>30}" for v in vs)
    lines.append(head)
    lines.append(f"  {'precision':16}" + "".join(
        f"{r['variants'][v]['precision'] + ', ' + r['variants'][v]['msda']:>30}" for v in vs))

    def cell(e: dict) -> str:
        return (f"{e['median'] * 1e3:.1f} ms [{e['min'] * 1e3:.0f}-{e['max'] * 1e3:.0f}] "
                f"x{e['speedup']:.2f}")

    rows = [("encoder", lambda x: x["encoder"]), ("decoder step", lambda x: x["decoder_step"])]
    for n in r["variants"][vs[0]]["total"]:
        rows.append((f"total {int(n):>2} step{'s' if int(n) > 1 else ' '}",
                     lambda x, n=n: x["total"][n]))
    for label, get in rows:
        lines.append(f"  {label:16}" + "".join(f"{cell(get(r['variants'][v])):>30}" for v in vs))
    if all("extra_step_ratio" in r["variants"][v] for v in vs):
        lines.append("  extra-step ratio r = (t3 - t1) / (2 t1):" + "".join(
            f" {v} {r['variants'][v]['extra_step_ratio']:.3f}" for v in vs))
    if r.get("step_gflop"):
        mm = r["matmul_gflops"]
        bf16 = (f"bf16 {mm['bf16']:.1f}" if r.get("bf16_hardware", True) else
                f"bf16 none (no bf16 hardware; emulated {mm['bf16']:.1f})")
        lines.append(f"  decoder step: {r['step_gflop']:.2f} GFLOP; matmul floor in this run "
                     f"fp32 {mm['fp32']:.1f}, {bf16} GFLOP/s "
                     f"({'x'.join(map(str, r['matmul_shape']))}); achieved:" + "".join(
                         f" {v} {r['variants'][v]['step_gflops']:.1f} GFLOP/s "
                         f"({100 * r['variants'][v]['floor_fraction']:.0f} % of its floor)"
                         for v in vs))
    bss = list(r["variants"][vs[0]]["throughput"])
    lines.append("  throughput (images/s, default steps; bN = `predict --batch-size N`): " + "; ".join(
        f"{v} " + ", ".join(f"b{bs} {r['variants'][v]['throughput'][bs]:.3g}" for bs in bss)
        for v in vs))
    def count(x) -> str:
        return "n/a (this kernel does not count them)" if x is None else str(x)

    lines.append("  minor page faults (process-wide; onnxruntime's own threads included) per "
                 "timed decoder step: " + ", ".join(
                     f"{v} {count(r['variants'][v]['step_minor_faults'])}" for v in vs))
    lines.append("    and per prediction in the memory pass: " + ", ".join(
        f"{v} {count(r['variants'][v].get('predict_minor_faults'))}" for v in vs))
    lines.append(f"  peak memory ({r['peak_memory_kind']}, own pass per variant, MiB): " + ", ".join(
        f"{v} {r['variants'][v]['peak_memory_MiB']:.1f}" if r['variants'][v]['peak_memory_MiB']
        is not None else f"{v} n/a (no working counter)" for v in vs))
    for v in vs:
        if "compile_s" in r["variants"][v]:
            lines.append(f"  {v}: compile time (first call) {r['variants'][v]['compile_s']:.1f} s")
    for note in r.get("notes", []):
        lines.append(f"  note: {note}")
    if r.get("noisy"):
        lines.append(f"  NOISY RUN: spread above {NOISY_SPREAD:.0%} of the median in "
                     f"{len(r['noisy'])} measurement(s) ({', '.join(r['noisy'][:4])}"
                     f"{', ...' if len(r['noisy']) > 4 else ''}); rerun on a quiet machine")
    return "\n".join(lines)
