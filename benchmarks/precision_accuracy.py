"""Accuracy of the fast inference paths on trained checkpoints (issue #16, part 3): the same
checkpoint evaluated on one split with

- ``grid_sample fp32``: today's path (the grid_sample deformable attention, fp32);
- ``gather fp32``: the embedding_bag deformable attention (the inference default), fp32;
- ``gather bf16``: the same under bf16 autocast (``--precision bf16``).

Same seeded noise in every setting (eval seeds), so differences are the arithmetic's only.
Prints each setting's metric per step count, its change against today's path, and the
evaluation's wall time (not interleaved: only indicative).

Usage: python benchmarks/precision_accuracy.py CKPT [CKPT ...] [--split val] [--steps 1,3]
       [--data-root DIR] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from densediff.api import load_model
from densediff.decoders.msda import msda_impl
from densediff.engine.evaluate import evaluate_steps
from densediff.tasks import build_dataset, spec_for

SETTINGS = [("grid_sample fp32", "grid_sample", "fp32"), ("gather fp32", "gather", "fp32"),
            ("gather bf16", "gather", "bf16")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--split", default="val")
    ap.add_argument("--steps", default="3")
    ap.add_argument("--data-root")
    ap.add_argument("--out")
    args = ap.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    report = {}
    for ckpt in args.checkpoints:
        overrides = [f"data.root={args.data_root}"] if args.data_root else []
        model, cfg, _, _ = load_model(ckpt, overrides)
        model.eval()
        key = spec_for(cfg).headline
        dataset = build_dataset(cfg, getattr(cfg.data, f"{args.split}_split", args.split),
                                train=False)
        rows = {}
        for name, impl, precision in SETTINGS:
            start = time.perf_counter()
            with msda_impl(impl):
                res = evaluate_steps(model, dataset, cfg, steps, progress=False,
                                     precision=precision)
            rows[name] = {"seconds": time.perf_counter() - start,
                          **{str(n): res[n][key] for n in steps}}
            print(f"{ckpt} {args.split} {name:18} " + "  ".join(
                f"{n} steps {key} {res[n][key]:.3f}" for n in steps)
                + f"  ({rows[name]['seconds']:.0f} s)", flush=True)
        ref = rows["grid_sample fp32"]
        for name in rows:
            rows[name]["change"] = {str(n): rows[name][str(n)] - ref[str(n)] for n in steps}
        report[str(ckpt)] = {"metric": key, "split": args.split, "settings": rows,
                             "images": len(dataset), "threads": torch.get_num_threads()}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
