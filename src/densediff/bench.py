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
- ``step_minor_faults``: minor page faults of the process during one decoder step (median;
  what the malloc settings of :mod:`densediff.utils.alloc` remove);
- ``peak_memory_MiB``: CUDA ``max_memory_allocated``, or on Linux the rise of the process's
  peak resident set (``VmHWM``, reset before each variant's pass) during one prediction at
  the largest batch;
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
  fp32 (needs the ``onnx`` extra; DDP segmentation/depth only).

Timing: ``warmup`` untimed rounds, then ``repeats`` rounds; in every round each measurement
is taken once per variant, the variants in a rotating order, so a busy period slows all of
them alike. Each number is the median over rounds with its min-max spread; a measurement
whose spread exceeds :data:`NOISY_SPREAD` of its median flags the run ``noisy``. Compare
variants as the reported ratios; absolute CPU times mean little.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from densediff.config import Config, config_from_dict

__all__ = ["NOISY_SPREAD", "VARIANTS", "bench", "format_bench"]

VARIANTS = ("eager", "fast", "compiled", "onnx")
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


def _vm(key: str) -> float | None:
    """``VmHWM`` / ``VmRSS`` of this process in MiB (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


class _Variant:
    """How one variant runs: its model (or onnxruntime stand-in) and the context of a call."""

    def __init__(self, name: str, model, precision: str, msda: str, fast_malloc: bool,
                 decoder: torch.nn.Module | None = None):
        self.name, self.model, self.precision = name, model, precision
        self.msda, self.fast_malloc, self.decoder = msda, fast_malloc, decoder
        self.compile_s: float | None = None

    @contextlib.contextmanager
    def active(self, device: torch.device):
        from densediff.decoders.msda import msda_impl
        from densediff.utils.alloc import set_glibc_fast
        from densediff.utils.precision import autocast

        set_glibc_fast(self.fast_malloc)
        swap = self.decoder is not None
        if swap:
            original, self.model.decoder = self.model.decoder, self.decoder
        try:
            with msda_impl(self.msda), autocast(self.precision, device):
                yield
        finally:
            if swap:
                self.model.decoder = original


def _onnx_model(model, cfg: Config, size: tuple[int, int], tmp: Path):
    """The model exported to ``tmp`` and loaded on onnxruntime (the ``onnx`` variant)."""
    from densediff.deploy import export_model, load_onnx_model

    export_model(model, cfg, tmp / "onnx", size=size)
    return load_onnx_model(tmp / "onnx")


@torch.no_grad()
def bench(cfg: Config, size: tuple[int, int] | None = None, batch: int = 1,
          steps: Sequence[int] | None = None, device: str | torch.device = "cpu",
          repeats: int = 10, variants: Sequence[str] | None = None,
          batches: Sequence[int] | None = None, precision: str = "auto",
          warmup: int = 1) -> dict:
    """Latencies (seconds), rates and peak memory of ``cfg``'s model per variant; see the
    module doc. ``steps``: the whole-prediction step counts (diffusion models; checked
    against the model's range); None: those of 1, 3, 5 the model can take. ``variants``:
    None: eager, fast and (where it applies and onnxruntime is installed) onnx. ``batches``:
    the batch sizes of the throughput measurement (None: just ``batch``)."""
    from densediff.api import resolve_device, resolve_precision_or_fail
    from densediff.data import class_info
    from densediff.errors import UserError
    from densediff.info import count_params
    from densediff.models import build_model
    from densediff.pipelines import check_steps, is_diffusion, pipeline_for

    if batch < 1 or repeats < 1 or warmup < 0:
        raise UserError("--batch and --repeats: must be at least 1")
    dev = resolve_device(device, "--device")
    fast_precision = resolve_precision_or_fail(precision, dev, "--precision")
    asked = list(variants) if variants is not None else list(DEFAULT_VARIANTS)
    bad = [v for v in asked if v not in VARIANTS]
    if bad or not asked:
        raise UserError(f"--variants: unknown variant {bad[0] if bad else '(none)'}; "
                        f"choose from {', '.join(VARIANTS)}")
    batches = sorted({int(b) for b in (batches or [batch])})
    if batches[0] < 1:
        raise UserError("--batches: every batch size must be at least 1")
    names, _ = class_info(cfg)
    model = build_model(cfg, len(names)).to(dev).eval()
    pipe = pipeline_for(cfg)
    diffusion = is_diffusion(model)
    # BEV: several cameras (+ points); --size sets each camera image
    img, (h, w) = pipe.example_input(cfg, size, batch, dev)
    if diffusion:
        if steps is None:
            top = model.max_steps or max(_DEFAULT_STEPS)
            steps = [n for n in _DEFAULT_STEPS if model.min_steps <= n <= top]
        check_steps(model, list(steps), "the model", "--steps")
    elif steps is not None:
        raise UserError("--steps: applies to diffusion models; this config's model "
                        f"({cfg.model.type}) takes no step count")
    else:
        steps = [1]
    notes: list[str] = []
    runs: dict[str, _Variant] = {}
    tmp = tempfile.TemporaryDirectory(prefix="densediff-bench-")
    for name in asked:
        if name == "eager":
            runs[name] = _Variant(name, model, "fp32", "grid_sample", False)
        elif name == "fast":
            runs[name] = _Variant(name, model, fast_precision, "auto", True)
        elif name == "compiled":
            if not hasattr(model, "decoder"):
                notes.append("compiled: skipped (the model has no map decoder to compile)")
                continue
            runs[name] = _Variant(name, model, fast_precision, "auto", True,
                                  decoder=torch.compile(model.decoder))
        elif name == "onnx":
            try:
                runs[name] = _Variant(name, _onnx_model(model, cfg, (h, w), Path(tmp.name)),
                                      "fp32", "auto", True)
            except UserError as e:  # not installed, or a model the exporter refuses
                notes.append(f"onnx: skipped ({e})")
    if "eager" not in runs:
        notes.append("speedup: relative to the first variant (eager was not run)")
    base = next(iter(runs))

    feats = {}
    for v in runs.values():
        with v.active(dev):
            feats[v.name] = v.model.extract(img)
    feat0 = feats[base]
    out: dict = {"config_model": cfg.model.type, "size": [h, w], "batch": batch,
                 "device": str(dev), "threads": torch.get_num_threads(), "repeats": repeats,
                 "warmup": warmup, "params_M": count_params(model) / 1e6,
                 "tokens_per_step": int(getattr(feat0, "features", feat0)[0, 0].numel()),
                 "variants": {}, "notes": notes}
    enc = cfg.model.encoder
    if cfg.model.type == "ddps":  # the base segmentor's encoder (config filled in by build_model)
        enc = config_from_dict(cfg.model.ddps.base_config).model.encoder
    out["encoder_name"], out["encoder_variant"] = enc.name, enc.variant

    def step_fn(v: _Variant) -> Callable[[], object]:
        f = feats[v.name]
        if diffusion:
            return lambda: v.model.decoder_step(f)
        return lambda: v.model.head(f)

    def predict_fn(v: _Variant, x, n: int) -> Callable[[], object]:
        fn = v.model.predict_map
        return (lambda: fn(x, steps=n)) if diffusion else (lambda: fn(x))

    # ---- the compile time: the first decoder call of the compiled variant
    if "compiled" in runs:
        v = runs["compiled"]
        with v.active(dev):
            v.compile_s = _timed(step_fn(v), dev)

    # ---- FLOPs of one step (eager fp32), for the achieved rate
    step_flops = None
    try:
        from torch.utils.flop_counter import FlopCounterMode

        from densediff.decoders.msda import msda_impl

        counter = FlopCounterMode(display=False)
        with counter, msda_impl("grid_sample"):  # eager fp32, the reference path
            (model.decoder_step(feat0) if diffusion else model.head(feat0))
        step_flops = counter.get_total_flops()
    except Exception as e:  # noqa: BLE001 (a model the counter cannot trace: no rate)
        notes.append(f"FLOP count unavailable ({type(e).__name__})")

    measures: list[tuple[str, Callable[[_Variant], Callable[[], object]]]] = [
        ("encoder", lambda v: (lambda: v.model.extract(img))),
        ("decoder_step", step_fn),
    ] + [(f"total{n}", lambda v, n=n: predict_fn(v, img, n)) for n in steps]
    times: dict[str, dict[str, list[float]]] = {v: {m: [] for m, _ in measures} for v in runs}
    faults: dict[str, list[int]] = {v: [] for v in runs}  # minor page faults per decoder step
    mm: dict[str, list[float]] = {"fp32": [], "bf16": []}
    # the floor: a matmul of the map decoder's own largest shape (its FFN's first linear:
    # tokens x channels @ channels x ffn_channels), at least 256 x 256 x 1024
    head = cfg.model.head
    m_ = max(out["tokens_per_step"] * batch, 256)
    k_, n_ = max(head.channels, 256), max(getattr(head, "ffn_channels", 0) or 0, 1024)
    out["matmul_shape"] = [m_, k_, n_]
    mats = {p: (torch.randn(m_, k_, device=dev, dtype=dt), torch.randn(k_, n_, device=dev, dtype=dt))
            for p, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    order = list(runs.values())
    for rnd in range(warmup + repeats):
        rot = order[rnd % len(order):] + order[:rnd % len(order)]
        for p, (a, b) in mats.items():
            t = _timed(lambda a=a, b=b: a @ b, dev)
            if rnd >= warmup:
                mm[p].append(t)
        for m, make in measures:
            for v in rot:
                with v.active(dev):
                    f0 = _minor_faults()
                    t = _timed(make(v), dev)
                    f1 = _minor_faults()
                if rnd >= warmup:
                    times[v.name][m].append(t)
                    if m == "decoder_step":
                        faults[v.name].append(f1 - f0)
    matmul_gflops = {p: 2 * m_ * k_ * n_ / statistics.median(ts) / 1e9 for p, ts in mm.items()}
    out["matmul_gflops"] = matmul_gflops
    out["step_gflop"] = step_flops / 1e9 if step_flops else None

    # ---- throughput at each batch size (default steps), interleaved the same way
    n_default = (model.default_steps if diffusion else 1)
    if diffusion and n_default not in steps:
        n_default = steps[-1]
    thr: dict[str, dict[int, list[float]]] = {v: {bs: [] for bs in batches} for v in runs}
    inputs = {bs: pipe.example_input(cfg, size, bs, dev)[0] for bs in batches}
    for rnd in range(warmup + max(1, repeats // 3)):
        rot = order[rnd % len(order):] + order[:rnd % len(order)]
        for bs in batches:
            for v in rot:
                with v.active(dev):
                    t = _timed(predict_fn(v, inputs[bs], n_default), dev)
                if rnd >= warmup:
                    thr[v.name][bs].append(bs / t)

    # ---- peak memory: one prediction at the largest batch per variant
    peaks: dict[str, float | None] = {}
    for v in order:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        reset = dev.type != "cuda" and _reset_peak_rss()
        before = _vm("VmRSS")
        with v.active(dev):
            predict_fn(v, inputs[batches[-1]], n_default)()
        if dev.type == "cuda":
            peaks[v.name] = torch.cuda.max_memory_allocated(dev) / 2**20
        elif reset and before is not None:
            peaks[v.name] = _vm("VmHWM") - before
        else:
            peaks[v.name] = None
    out["peak_memory_kind"] = ("cuda max_memory_allocated" if dev.type == "cuda" else
                               "rise of the process peak RSS during the prediction")

    noisy = []
    for v in order:
        r: dict = {"precision": v.precision, "msda": v.msda if v.name != "onnx" else "GridSample",
                   "malloc": "no-mmap" if v.fast_malloc else "glibc default"}
        if v.name == "onnx":
            r["precision"], r["malloc"] = "fp32", "onnxruntime arena"
        for m, ts in times[v.name].items():
            med = statistics.median(ts)
            spread = (max(ts) - min(ts)) / med if med > 0 else 0.0
            if spread > NOISY_SPREAD and len(ts) > 1:
                noisy.append(f"{v.name} {m}")
            ref = times[base][m]
            entry = {"median": med, "min": min(ts), "max": max(ts),
                     "speedup": statistics.median(a / b for a, b in zip(ref, ts))}
            if m.startswith("total"):
                r.setdefault("total", {})[int(m[5:])] = entry
            else:
                r[m] = entry
        if 1 in r.get("total", {}) and 3 in r["total"] and diffusion:
            t1, t3 = r["total"][1]["median"], r["total"][3]["median"]
            r["extra_step_ratio"] = (t3 - t1) / (2 * t1)
        if step_flops:
            rate = step_flops / r["decoder_step"]["median"] / 1e9
            r["step_gflops"] = rate
            r["floor_fraction"] = rate / matmul_gflops["bf16" if v.precision == "bf16" else "fp32"]
        r["step_minor_faults"] = int(statistics.median(faults[v.name]))
        r["throughput"] = {bs: statistics.median(x) for bs, x in thr[v.name].items()}
        r["peak_memory_MiB"] = peaks[v.name]
        if v.compile_s is not None:
            r["compile_s"] = v.compile_s
        out["variants"][v.name] = r
    out["noisy"] = noisy
    out["base_variant"] = base
    # the first variant's numbers at the top level (the pre-variant report format)
    first = out["variants"][base]
    out["encoder"] = first["encoder"]["median"]
    out["decoder_step"] = first["decoder_step"]["median"]
    out["total"] = {n: e["median"] for n, e in first["total"].items()}
    if "extra_step_ratio" in first:
        out["extra_step_ratio"] = first["extra_step_ratio"]
    out["peak_memory_MiB"] = first["peak_memory_MiB"]
    tmp.cleanup()
    return out


def format_bench(r: dict) -> str:
    """The report of :func:`bench` as text: one column per variant."""
    vs = list(r["variants"])
    base = r.get("base_variant", vs[0])
    lines = [f"model {r['config_model']} ({r['encoder_name']} {r['encoder_variant']}), "
             f"{r['params_M']:.2f} M params, input {r['batch']}x3x{r['size'][0]}x{r['size'][1]} "
             f"on {r['device']} ({r['threads']} threads), {r['tokens_per_step']} tokens/step, "
             f"median of {r['repeats']} interleaved rounds [min-max], speedup vs {base}"]
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
        lines.append(f"  decoder step: {r['step_gflop']:.2f} GFLOP; matmul floor in this run "
                     f"fp32 {mm['fp32']:.1f}, bf16 {mm['bf16']:.1f} GFLOP/s "
                     f"({'x'.join(map(str, r['matmul_shape']))}); achieved:" + "".join(
                         f" {v} {r['variants'][v]['step_gflops']:.1f} GFLOP/s "
                         f"({100 * r['variants'][v]['floor_fraction']:.0f} % of its floor)"
                         for v in vs))
    bss = list(r["variants"][vs[0]]["throughput"])
    lines.append("  throughput (images/s, default steps): " + "; ".join(
        f"{v} " + ", ".join(f"b{bs} {r['variants'][v]['throughput'][bs]:.3g}" for bs in bss)
        for v in vs))
    lines.append("  minor page faults per decoder step (process-wide; onnxruntime's own "
                 "threads included): " + ", ".join(
                     f"{v} {r['variants'][v]['step_minor_faults']}" for v in vs))
    lines.append(f"  peak memory ({r['peak_memory_kind']}, MiB): " + ", ".join(
        f"{v} {r['variants'][v]['peak_memory_MiB']:.1f}" if r['variants'][v]['peak_memory_MiB']
        is not None else f"{v} n/a" for v in vs))
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
