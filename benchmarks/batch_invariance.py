"""What bit-identical batches cost (issue #25): whole ``--steps``-step predictions of a
config's model (random weights) on the fast path (gather attention, no-mmap malloc, fp32) at
batch 1 and at each ``--batches`` size, with and without
:func:`densediff.utils.batching.batch_invariant` (the per-image convolution and linear layers
that make a batch's outputs equal its images' alone), interleaved in rotating order; and
whether each batched output is bit-identical to batch 1.

Usage: python benchmarks/batch_invariance.py [CONFIG] [--size 512] [--batches 4]
       [--steps 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from fast_path import predict, random_model

from densediff.utils import memstat
from densediff.utils.precision import cpu_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", nargs="?", default="ade20k/ddp_swin_t.yaml")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batches", default="4")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    _, model = random_model(args.config)
    batches = [int(b) for b in args.batches.split(",")]
    x = torch.randn(max(batches), 3, args.size, args.size)

    def run(b: int, exact: bool) -> torch.Tensor:
        return predict(model, x[:b], args.steps, exact)

    variants = [("batch 1", 1, True)] + [(f"batch {b}{' exact' if e else ''}", b, e)
                                         for b in batches for e in (True, False)]
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    outs: dict[str, torch.Tensor] = {}
    for r in range(args.rounds + 1):
        for name, b, exact in variants[r % len(variants):] + variants[:r % len(variants)]:
            t = time.perf_counter()
            out = run(b, exact)
            if r:
                times[name].append((time.perf_counter() - t) / b)
            outs[name] = out
    ones = torch.cat([predict(model, x[i:i + 1], args.steps, seeds=[i])
                      for i in range(max(batches))])
    print(f"{args.config} {args.size}x{args.size}, {args.steps} steps, fp32 fast path, "
          f"{torch.get_num_threads()} threads, {cpu_model()} ({' '.join(memstat.cpu_flags())}); "
          f"median of {args.rounds} interleaved rounds")
    for name, b, _ in variants:
        med = statistics.median(times[name])
        same = torch.equal(outs[name], ones[:b])
        diff = float((outs[name] - ones[:b]).abs().max())
        ratio = statistics.median(a / b for a, b in zip(times["batch 1"], times[name]))
        print(f"{name:>14}: {med:.3f} s/image [{min(times[name]):.3f}-{max(times[name]):.3f}], "
              f"images/s x{ratio:.2f} batch 1 (median of per-round ratios); "
              f"{'bit-identical to batch 1' if same else f'max |diff| vs batch 1 {diff:.2g}'}")


if __name__ == "__main__":
    main()
