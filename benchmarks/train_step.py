"""One training iteration (forward, backward, AdamW step) of DDP and of its non-diffusion twin,
per execution variant, interleaved in one process (issue #16: "a DDP train step <= 1.10x its
twin's and faster than today's").

Variants:
- ``today``: the grid_sample deformable attention for training, glibc's default malloc, fp32;
- ``default``: what ``densediff train`` does now (the attention ``auto`` picks for training,
  the no-mmap malloc of ``densediff.utils.alloc``), fp32;
- ``bf16``: ``default`` with ``train.precision=bf16`` (autocast; sampling locations, losses and
  the diffusion arithmetic in fp32).

Random weights and a random batch (the cost does not depend on them). Each round runs every
(model, variant) once in a rotating order; reported: median [min-max] seconds per iteration
and each one's ratio to the twin's ``default`` of the same round (median over rounds).

Usage: python benchmarks/train_step.py [--ddp ade20k/ddp_swin_t.yaml] [--twin ade20k/twin_swin_t.yaml]
       [--size 512 512] [--batch 1] [--rounds 3] [--out benchmarks/runs/train_step.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from densediff.decoders.msda import msda_impl
from densediff.engine.optim import build_optimizer
from densediff.engine.trainer import train_step
from densediff.tasks import build_model, class_info, load_config
from densediff.utils.alloc import set_glibc_fast

VARIANTS = {"today": ("grid_sample", False, "fp32"), "default": ("auto", True, "fp32"),
            "bf16": ("auto", True, "bf16")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ddp", default="ade20k/ddp_swin_t.yaml")
    ap.add_argument("--twin", default="ade20k/twin_swin_t.yaml")
    ap.add_argument("--size", type=int, nargs=2, default=[512, 512])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    h, w = args.size
    torch.manual_seed(0)
    models = {}
    for name, path in (("ddp", args.ddp), ("twin", args.twin)):
        cfg = load_config(path, list(args.overrides))
        cfg.model.encoder.pretrained = None
        k = len(class_info(cfg)[0])
        model = build_model(cfg, k).train()
        models[name] = (model, build_optimizer(model, cfg.train), k)
    img = torch.randn(args.batch, 3, h, w)
    runs = [(m, v) for m in ("ddp", "twin") for v in VARIANTS]

    def one(model_name: str, variant: str) -> float:
        model, opt, k = models[model_name]
        impl, fast, precision = VARIANTS[variant]
        label = torch.randint(0, k, (args.batch, h, w))
        set_glibc_fast(fast)
        with msda_impl(impl):
            start = time.perf_counter()
            train_step(model, opt, iter([{"image": img, "label": label}]), precision=precision)
            return time.perf_counter() - start

    times = {r: [] for r in runs}
    for rnd in range(args.rounds + 1):  # round 0: warm-up
        rot = runs[rnd % len(runs):] + runs[:rnd % len(runs)]
        for r in rot:
            t = one(*r)
            if rnd:
                times[r].append(t)
            print(f"round {rnd} {r[0]:4} {r[1]:8} {t:.2f} s", flush=True)
    ref = times[("twin", "default")]
    result = {"size": [h, w], "batch": args.batch, "rounds": args.rounds,
              "threads": torch.get_num_threads(), "runs": {}}
    print(f"\ntrain iteration at {args.batch}x3x{h}x{w}, median of {args.rounds} interleaved rounds")
    for (m, v), ts in times.items():
        ratio = statistics.median(a / b for a, b in zip(ts, ref))
        result["runs"][f"{m}/{v}"] = {"median_s": statistics.median(ts), "min_s": min(ts),
                                      "max_s": max(ts), "vs_twin_default": ratio}
        print(f"  {m:4} {v:8} {statistics.median(ts):7.2f} s [{min(ts):.2f}-{max(ts):.2f}]  "
              f"x{ratio:.2f} of twin/default")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
