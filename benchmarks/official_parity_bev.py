"""Official parity, BEV camera model: densediff on the converted official checkpoint against
the official code's own outputs (the dump of ``benchmarks/official_bev_oracle.py dump``).

Runs in densediff's venv; it never imports the official code. It converts
``<dumps>/ddp-camera-bev256d2-lss-scale001-d5-lr5e-5.pth`` (random perturbed weights in the
official layout) with ``densediff convert`` (the CLI, in a subprocess), loads the result with
``densediff.load`` and compares, on the same inputs (images, intrinsics, camera->ego; no
augmentation; the BEV frame = the ego frame), max |diff| of:

- the camera backbone's 3 levels (``model.encoder`` levels 2-4) and the camera neck;
- the LSS splat before the downsample convs (``view.lift.splatted``: geometry, depth x context,
  the bev_pool sum), after them (``view.lift``), and the BEV decoder output (``model.extract``);
- the time embedding, the fused input and one map-head call (sigmoid) on the official decoder
  output, noisy map and t;
- the start noise (``seeds=[seed]``), every sampling step's probabilities, the sampler output
  (mean over steps and starts) and the whole model from the images (``predict_probs``), plus
  the agreement of the 0.5-thresholded maps (and, where they differ, how far the official
  probability is from 0.5).

Pass: every max |diff| <= ``--tol`` (1e-4); a 0.5-thresholded cell may differ only where the
official probability is within the whole-model max |diff| of 0.5 (a round-off tie).

    .venv/bin/python benchmarks/official_parity_bev.py --dumps /tmp/bevparity --work /tmp/bevwork
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from densediff.utils.precision import cpu_model

NAME = "ddp-camera-bev256d2-lss-scale001-d5-lr5e-5"
TOL = 1e-4


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a.double() - b.double()).abs().max())


@torch.no_grad()
def compare(model, d: dict) -> dict:

    info = d["info"]
    img, intr, cam2ego = d["img"], d["intrinsics"], d["cam2ego"]
    size = tuple(img.shape[-2:])
    out: dict = {}
    levels = model.encoder(img.flatten(0, 1))
    out["backbone"] = [maxdiff(a, b) for a, b in zip(levels[1:], d["backbone"])]
    neck = model.neck(levels)
    out["camera_neck"] = maxdiff(neck, d["neck"])
    lift = model.view.lift
    out["lss_splat"] = maxdiff(lift.splatted(neck, size, intr, cam2ego), d["lifted"])
    out["lss_downsampled"] = maxdiff(lift(neck, size, intr, cam2ego), d["bev"])
    inputs = {"images": img, "intrinsics": intr, "cam2ego": cam2ego}
    feat = model.extract(inputs)
    out["bev_decoder"] = maxdiff(feat, d["decoder"])
    log_snr = model.schedule(d["t"])
    out["log_snr"] = maxdiff(log_snr, d["log_snr"])
    out["fused"] = maxdiff(model.fuse(torch.cat([d["decoder"], d["x_t"]], 1)), d["fused"])
    out.update(compare_sampling(model, d, feat, inputs))
    out["official_bev_pool_check"] = info["bev_pool_check"]
    return out


@torch.no_grad()
def compare_sampling(model, d: dict, feat: torch.Tensor, inputs: dict) -> dict:
    """The diffusion stages of a BEV model against an oracle dump: time embedding, one head
    call, the seeded start noise, every sampling step, the sampler output and the whole model
    from its inputs, and how many thresholded cells differ (with the official margin there)."""
    from densediff.diffusion.samplers import seeded_normal

    info = d["info"]
    seed, steps, r = info["seed"], info["steps"], info["randsteps"]
    log_snr = model.schedule(d["t"])
    out: dict = {"time_emb": maxdiff(model.time_mlp(log_snr), d["time_emb"]),
                 "head_call": maxdiff(model.denoise(d["decoder"], d["x_t"], log_snr).sigmoid(),
                                      d["head_probs"])}
    noise = seeded_normal((r, *d["noise"].shape[1:]), [torch.Generator().manual_seed(seed)],
                          "cpu")
    out["noise"] = maxdiff(noise, d["noise"])
    traj = model.sample_steps(feat, steps, seeds=[seed], randsteps=r)
    out["step_probs"] = [maxdiff(lg[0].sigmoid(), ref) for lg, ref in zip(traj.steps,
                                                                          d["step_probs"])]
    out["sample"] = maxdiff(traj.output(True), d["sample"])
    probs = model.predict_map(inputs, seeds=[seed], randsteps=r)
    out["whole_model"] = maxdiff(probs[0], d["masks_bev"])
    ours, ref = probs[0] > 0.5, d["masks_bev"] > 0.5
    differ = ours != ref
    out["thresholded_agree"] = float((ours == ref).float().mean())
    out["thresholded_differ"] = int(differ.sum())
    # how close the official probability is to the threshold where the maps differ
    out["official_margin_at_differ"] = (float((d["masks_bev"][differ] - 0.5).abs().max())
                                        if differ.any() else 0.0)
    return out


NOT_DIFFS = ("thresholded_agree", "thresholded_differ", "official_margin_at_differ",
             "official_bev_pool_check")


def passed(r: dict, tol: float) -> bool:
    """Every max |diff| <= tol, and a thresholded cell may differ only where the official
    probability is within round-off (the whole-model max |diff|) of 0.5."""
    vals = []
    for k, v in r.items():
        if k not in NOT_DIFFS:
            vals.extend(v if isinstance(v, list) else [v])
    return max(vals) <= tol and r["official_margin_at_differ"] <= r["whole_model"]


def table(r: dict, info: dict, tol: float) -> str:
    def f(v):
        return " / ".join(f"{x:.1e}" for x in v) if isinstance(v, list) else (
            f"{v:.1e}" if isinstance(v, float) else str(v))

    rows = [f"| {k} | {f(v)} |" for k, v in r.items() if k not in NOT_DIFFS]
    rows.append(f"| 0.5-thresholded maps agree | {100 * r['thresholded_agree']:.4f} % "
                f"({r['thresholded_differ']} cells differ; official |p - 0.5| there <= "
                f"{r['official_margin_at_differ']:.1e}) |")
    rows.append(f"| official bev_pool reference vs a per-point loop | "
                f"{r['official_bev_pool_check']:.1e} |")
    head = (f"{NAME}, random perturbed weights, {info['cameras']} cameras at "
            f"{info['size'][0]}x{info['size'][1]}, {info['steps']} steps, "
            f"{info['randsteps']} starts, seed {info['seed']}: "
            f"{'PASS' if passed(r, tol) else 'FAIL'} (tol {tol:g})")
    return "\n".join([head, "", "| stage | max abs diff |", "|---|---|", *rows])


def run(argv, name: str, compare, table, passed, out_json: str, doc: str) -> int:
    """Convert ``<dumps>/<name>.pth`` with ``densediff convert``, compare the converted model
    with every ``<name>_<H>x<W>.pt`` dump of the oracle (``compare``), print each ``table``
    and write ``<work>/<out_json>``; exit status 0 when every dump ``passed``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--dumps", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--tol", type=float, default=TOL)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    import densediff

    dumps = sorted(a.dumps.glob(f"{name}_*x*.pt"))
    if not dumps:
        print(f"no {name}_<H>x<W>.pt under {a.dumps}", file=sys.stderr)
        return 1
    out = a.work / "converted"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "densediff.cli.main", "convert",
                          str(a.dumps / f"{name}.pth"), str(out)], capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stdout + res.stderr, file=sys.stderr)
        return 1
    convert_s = time.time() - t0
    model = densediff.load(str(out)).model.eval()
    ok, results = True, {}
    for path in dumps:
        d = torch.load(path, weights_only=False)
        t0 = time.time()
        r = compare(model, d)
        results[path.name] = dict(r, seconds=round(time.time() - t0, 1))
        print(table(r, d["info"], a.tol) + "\n", flush=True)
        ok &= passed(r, a.tol)
    meta = dict(cpu=cpu_model(), date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
                convert_seconds=round(convert_s, 1), passed=ok)
    (a.work / out_json).write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    print(json.dumps(meta))
    return 0 if ok else 1


def main(argv=None) -> int:
    return run(argv, NAME, compare, table, passed, "bev_parity.json", __doc__)


if __name__ == "__main__":
    sys.exit(main())
