"""Does a DDP model's map decoder *use* its noisy map? Diagnostics with controls.

DDP's claims over a discriminative decoder (refinement from the noisy map y_t, more steps =
better, uncertainty from the trajectory) all rest on the decoder reading y_t. A rising step
curve alone does not show that: a single decoder call at another time label can give the same
gain. :func:`diagnose` measures, on the first ``limit`` samples of a split:

- **map reliance**: at t in :data:`RELIANCE_TIMES`, y_t = alpha(t) y_0 + sigma(t) eps is built
  (same eps) from the sample's own GT and from another sample's GT; the task metric of each
  and the relative L2 change of the decoder output ``||f(own) - f(other)|| / ||f(own)||``.
  A decoder that ignores y_t shows 0 change and equal metrics; one that copies it, a large
  change and a metric near perfect for ``own``.
- **single-call controls**: one decoder call on pure noise and on a zero map at each time label
  in :data:`CONTROL_TIMES` -> metric. The sampler's step curve is then compared with the best
  control, not only with its own first step.
- **sampler**: the metric at each step count (the same seeded noise as ``eval``) and the
  per-step change rate (share of pixels whose label changes from one step to the next; depth:
  mean |change| / mean depth).
- **fuse weights**: the RMS of the fuse conv's input weights on the feature channels and on
  the map channels, beside their RMS at initialisation (Kaiming normal).

The task metric is mIoU for segmentation and BEV (higher is better) and AbsRel for depth
(lower is better).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import islice

import torch
from torch import nn

from densediff.config import Config
from densediff.diffusion.noise import add_noise, generators, seeded_normal
from densediff.engine.evaluate import _images
from densediff.models import DDP
from densediff.models.interface import Trajectory
from densediff.pipelines import sample_seed
from densediff.tasks import spec_for
from densediff.utils import distributed as du

__all__ = ["CONTROL_TIMES", "RELIANCE_TIMES", "diagnose", "format_diagnosis",
           "gains_over_controls", "is_ddp", "single_call_controls", "task_metric"]

RELIANCE_TIMES = (0.0, 0.25, 0.5, 0.75, 0.95)
CONTROL_TIMES = (1.0, 0.999, 0.95, 0.5, 1 / 3)
DEFAULT_STEPS = (1, 2, 3, 5, 10)


# --------------------------------------------------------------------------------------------
# the task's metric on a trajectory


def task_metric(cfg: Config) -> tuple[str, bool]:
    """(the metric the diagnostics report, lower is better): the task's headline metric
    (``TaskSpec.headline``: AbsRel for depth, else mIoU)."""
    spec = spec_for(cfg)
    return spec.headline, spec.headline in spec.lower_is_better


class _Scorer:
    """One accumulating task metric: ``update(trajectory, label)``, then ``value()``."""

    def __init__(self, model: nn.Module, dataset, cfg: Config, device: torch.device):
        self.model = model
        self.pipe = spec_for(cfg).pipeline
        self.key, self.lower_is_better = task_metric(cfg)
        # mIoU only: no boundary bands (most of a score's cost at full resolution).
        self.metric = self.pipe.metric(dataset, cfg, device, boundary=False)

    def update(self, traj, label: torch.Tensor) -> None:
        self.pipe.score_trajectory(self.model, self.metric, traj, label)

    def value(self) -> float:
        self.metric.reduce()
        return float(self.metric.compute()[self.key])


def _one_step(model: nn.Module, out: torch.Tensor):
    """One decoder output as a one-step trajectory (R = 1 start)."""
    return Trajectory([out[:, None]], model.output_kind)


def _rel_change(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(squared norm of a - b, squared norm of a): summed over samples, divided at the end."""
    return float((a - b).double().pow(2).sum()), float(a.double().pow(2).sum())


def _log_snr(model: nn.Module, t: float, n: int, device: torch.device) -> torch.Tensor:
    return model.schedule(torch.full((n,), float(t), device=device))


def is_ddp(model: nn.Module) -> bool:
    """True for DDP models (any task): a map decoder ``denoise(features, y_t, log_snr)``, a
    map encoding of the GT and a continuous noise schedule."""
    return isinstance(du.unwrap(model), DDP)


def _check_ddp(model: nn.Module) -> None:
    if not is_ddp(model):
        raise TypeError("diagnostics need a DDP model (a map decoder denoise(features, y_t, "
                        "log_snr) and a map encoding)")


# --------------------------------------------------------------------------------------------
# the diagnostics


@torch.no_grad()
def control_pairs(times: Sequence[float] = CONTROL_TIMES) -> list[tuple[str, float]]:
    """Every single-call control: (``noise`` | ``zero``, t) for each time label t."""
    return [(k, float(t)) for k in ("noise", "zero") for t in times]


def single_call_controls(model: nn.Module, dataset, cfg: Config, limit: int | None = None,
                         pairs: Sequence[tuple[str, float]] | None = None,
                         progress: bool = False) -> list[dict]:
    """One decoder call on pure noise (the sampler's own seeded start) or on a zero map at a
    time label, for each ``(input, t)`` in ``pairs`` (default :func:`control_pairs`; e.g. only
    the best control chosen on val): ``[{"input": "noise"|"zero", "t": t, "metric": value}]``."""
    model = du.unwrap(model)
    _check_ddp(model)
    device = next(model.parameters()).device
    pairs = control_pairs() if pairs is None else pairs
    bad = [k for k, _ in pairs if k not in ("noise", "zero")]
    if bad or not pairs:
        raise ValueError(f"control inputs are noise or zero, got {bad or 'none'}")
    scorers = {(k, float(t)): _Scorer(model, dataset, cfg, device) for k, t in pairs}
    gen = _images(model, dataset, cfg, progress)  # eval mode while it runs
    try:
        for index, img, label in islice(gen, limit):
            _update_controls(model, cfg, index, model.extract(img), label, scorers)
    finally:
        gen.close()
    return [{"input": k, "t": t, "metric": s.value()} for (k, t), s in scorers.items()]


def _update_controls(model: nn.Module, cfg: Config, index: int, feat: torch.Tensor,
                     label: torch.Tensor, scorers: dict) -> None:
    """Score one decoder call per ``(input, t)`` key of ``scorers``: on the sample's seeded
    starting noise or on a zero map, at time label t."""
    y0 = model.encode_target(label, tuple(feat.shape[-2:]))
    maps = {"noise": _seeded_noise(y0, cfg, index), "zero": torch.zeros_like(y0)}
    for (kind, t), scorer in scorers.items():
        ls = _log_snr(model, t, feat.shape[0], feat.device)
        scorer.update(_one_step(model, model.denoise(feat, maps[kind], ls)), label)


def _seeded_noise(y0: torch.Tensor, cfg: Config, index: int) -> torch.Tensor:
    """The sampler's starting noise of dataset item ``index`` (its eval seed)."""
    gens = generators([sample_seed(cfg, index)], y0.device)
    return seeded_normal(y0.shape, gens, y0.device, y0.dtype)


def best_control(controls: list[dict], lower_is_better: bool) -> dict:
    """The best single-call control by its metric."""
    pick = min if lower_is_better else max
    return pick(controls, key=lambda c: c["metric"])


def gains_over_controls(step_metrics: dict[int, float], controls: list[dict],
                        lower_is_better: bool) -> dict:
    """Each step count's gain over the best control and over step 1 (positive = better, in
    the metric's units; for lower-is-better metrics the sign is flipped)."""
    best = best_control(controls, lower_is_better)
    sign = -1.0 if lower_is_better else 1.0
    first = step_metrics.get(1)
    return {"best_control": best,
            "over_best_control": {n: sign * (v - best["metric"]) for n, v in step_metrics.items()},
            "over_step_1": ({n: sign * (v - first) for n, v in step_metrics.items()}
                            if first is not None else {})}


def fuse_weight_sizes(model: nn.Module) -> dict:
    """RMS of the fuse conv's weights on the feature channels and on the map channels, and
    the RMS a Kaiming-normal initialisation gives (sqrt(2 / fan_in))."""
    w = model.fuse.weight.detach().float()
    c_map = model.map_encoding.channels
    c_feat = w.shape[1] - c_map
    rms = lambda x: float(x.pow(2).mean().sqrt())  # noqa: E731
    fan_in = w.shape[1] * w.shape[2] * w.shape[3]
    return {"features": rms(w[:, :c_feat]), "map": rms(w[:, c_feat:]),
            "init": math.sqrt(2.0 / fan_in), "feature_channels": c_feat, "map_channels": c_map}


def _samples(model: nn.Module, dataset, cfg: Config, limit: int | None, progress: bool
             ) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """The first ``limit`` samples of ``dataset`` as (index, input, label) on the device."""
    gen = _images(model, dataset, cfg, progress)
    try:
        return list(islice(gen, limit))
    finally:
        gen.close()


@torch.no_grad()
def diagnose(model: nn.Module, dataset, cfg: Config, limit: int | None = 32,
             steps: Sequence[int] = DEFAULT_STEPS, reliance_times: Sequence[float] = RELIANCE_TIMES,
             control_times: Sequence[float] = CONTROL_TIMES, progress: bool = True) -> dict:
    """All diagnostics of a DDP model on the first ``limit`` samples of ``dataset`` (None: all;
    at least 2).

    Returns a JSON-ready dict: ``metric`` (name), ``lower_is_better``, ``samples``,
    ``reliance`` (per t: ``metric_own``, ``metric_other``, ``rel_change``), ``controls`` (per
    input and t: ``metric``), ``sampler`` (per step count: ``metric``, ``change_rates``),
    ``gains`` (:func:`gains_over_controls`) and ``fuse`` (:func:`fuse_weight_sizes`).
    "Another sample" is the previous sample of the split (the last one for the first).
    """
    model = du.unwrap(model)
    _check_ddp(model)
    device = next(model.parameters()).device
    steps = list(dict.fromkeys(int(s) for s in steps))
    samples = _samples(model, dataset, cfg, limit, progress)
    if len(samples) < 2:
        raise ValueError(f"diagnostics need at least 2 samples (another sample's GT), got "
                         f"{len(samples)}")
    new = lambda: _Scorer(model, dataset, cfg, device)  # noqa: E731
    own = {t: new() for t in reliance_times}
    other = {t: new() for t in reliance_times}
    change = {t: [0.0, 0.0] for t in reliance_times}
    controls = {pair: new() for pair in control_pairs(control_times)}
    sampler = {n: new() for n in steps}
    rates: dict[int, list[list[float]]] = {n: [] for n in steps}
    was_training = model.training
    model.eval()
    try:
        for i, (index, img, label) in enumerate(samples):
            feat = model.extract(img)
            _reliance(model, index, feat, label, samples[i - 1][2], own, other, change, cfg)
            _update_controls(model, cfg, index, feat, label, controls)
            for n, scorer in sampler.items():
                traj = model.sample_steps(feat, n, seeds=[sample_seed(cfg, index)])
                scorer.update(traj, label)
                if n > 1:
                    rates[n].append(spec_for(cfg).pipeline.change_rates(traj))
    finally:
        model.train(was_training)
    result_controls = [{"input": k, "t": t, "metric": s.value()} for (k, t), s in controls.items()]
    step_metrics = {n: s.value() for n, s in sampler.items()}
    first = next(iter(sampler.values()))
    return {
        "metric": first.key, "lower_is_better": first.lower_is_better, "samples": len(samples),
        "reliance": [{"t": t, "metric_own": own[t].value(), "metric_other": other[t].value(),
                      "rel_change": math.sqrt(change[t][0] / max(change[t][1], 1e-30))}
                     for t in reliance_times],
        "controls": result_controls,
        "sampler": [{"steps": n, "metric": step_metrics[n],
                     "change_rates": [sum(r) / len(r) for r in zip(*rates[n])] if rates[n] else []}
                    for n in steps],
        "gains": gains_over_controls(step_metrics, result_controls, first.lower_is_better),
        "fuse": fuse_weight_sizes(model),
    }


def _reliance(model, index, feat, label, other_label, own, other, change, cfg) -> None:
    """Decoder outputs on y_t built from the own and from another GT (same noise)."""
    size = tuple(feat.shape[-2:])
    y_own, y_other = model.encode_target(label, size), model.encode_target(other_label, size)
    gens = generators([sample_seed(cfg, index) + 7919], feat.device)
    eps = seeded_normal(y_own.shape, gens, feat.device, y_own.dtype)
    for t in own:
        ls = _log_snr(model, t, feat.shape[0], feat.device)
        out_own = model.denoise(feat, add_noise(y_own, ls, eps), ls)
        out_other = model.denoise(feat, add_noise(y_other, ls, eps), ls)
        own[t].update(_one_step(model, out_own), label)
        other[t].update(_one_step(model, out_other), label)
        d, n = _rel_change(out_own, out_other)
        change[t][0] += d
        change[t][1] += n


def format_diagnosis(d: dict) -> str:
    """The diagnostics as plain-text tables."""
    m = d["metric"]
    arrow = "lower is better" if d["lower_is_better"] else "higher is better"
    lines = [f"diagnostics on {d['samples']} samples; metric {m} ({arrow})", "",
             "map reliance: y_t from the sample's own GT vs another sample's GT (same noise)",
             f"{'t':>6} | {m + ' own':>12} | {m + ' other':>12} | {'output change':>13}"]
    for r in d["reliance"]:
        lines.append(f"{r['t']:6.3f} | {r['metric_own']:12.4g} | {r['metric_other']:12.4g} | "
                     f"{r['rel_change']:13.4f}")
    lines += ["", "single decoder call (controls)",
              f"{'input':>6} | {'t':>6} | {m:>10}"]
    for c in d["controls"]:
        lines.append(f"{c['input']:>6} | {c['t']:6.3f} | {c['metric']:10.4g}")
    g = d["gains"]
    bc = g["best_control"]
    lines += ["", f"sampler (best control: {bc['input']} map at t = {bc['t']:.3f}, "
              f"{m} {bc['metric']:.4g})",
              f"{'steps':>5} | {m:>10} | {'gain vs best control':>20} | {'gain vs 1 step':>14} | "
              "change rate per step"]
    for s in d["sampler"]:
        n = s["steps"]
        vs1 = g["over_step_1"].get(n)
        lines.append(f"{n:>5} | {s['metric']:10.4g} | {g['over_best_control'][n]:20.4g} | "
                     f"{'' if vs1 is None else format(vs1, '.4g'):>14} | "
                     + " ".join(f"{x:.4f}" for x in s["change_rates"]))
    f = d["fuse"]
    lines += ["", f"fuse weights RMS: features {f['features']:.4g} ({f['feature_channels']} ch), "
              f"map {f['map']:.4g} ({f['map_channels']} ch); Kaiming init {f['init']:.4g}"]
    return "\n".join(lines)
