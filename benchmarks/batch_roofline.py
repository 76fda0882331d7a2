"""Does batching pay on the CPU? (issue #26, part 3): the map decoder step of a config's
model (random weights) on the fast path (gather attention, no-mmap malloc, fp32 by default)
at each batch size, per image, against the matmul floor at the same batch (the decoder's
largest matmul, tokens * batch x channels @ channels x FFN channels), interleaved: every round
times each batch size once, in a rotating order.

Per batch size it prints: the step's seconds per image, its GFLOP/s (FlopCounterMode's
matmul/conv FLOPs), the floor's GFLOP/s, the step's share of the floor, and the minor page
faults per step; the encoder likewise (seconds and GFLOP/s per image). If the floor's rate does
not rise with the batch (the matmuls of one image are already large enough to run at the
CPU's peak), batching cannot make a step cheaper per image: that is the roofline argument,
and the table is its measurement. Its bound: no batch can make an image's ``--steps``-step
prediction faster than its FLOPs at the best matmul rate measured in the run (the floor of
any batch size, the best of three calls per round), so the batch-1 time over that is the
most any batch can gain.

Then, per batch size, one decoder step under a dispatch mode that times every operation: the
matrix products' (mm, addmm, bmm, convolution) seconds per image, and the other operations'
seconds and bytes (inputs + outputs, views excluded) per image, i.e. their effective GB/s,
against the memory bandwidth of a large add (DRAM) and of one that fits the L3 cache, timed
in the same process: where the other operations already run at memory speed, per image, a
batch cannot make them cheaper (their bytes grow with the batch; a bigger batch only pushes
the working set out of the cache).

Usage: python benchmarks/batch_roofline.py [CONFIG] [--size 512] [--batches 1,2,4]
       [--rounds 3] [--steps 3] [--precision fp32] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from fast_path import random_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from densediff.decoders.msda import msda_impl
from densediff.utils import memstat
from densediff.utils.precision import autocast, cpu_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", nargs="?", default="ade20k/ddp_swin_t.yaml")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batches", default="1,2,4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--out")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    cfg, model = random_model(args.config)
    head = cfg.model.head
    feats = {}
    with torch.no_grad(), msda_impl("gather"), autocast(args.precision, "cpu"):
        for b in batches:
            feats[b] = model.extract(torch.randn(b, 3, args.size, args.size))
    tokens = int(feats[batches[0]][0, 0].numel())
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.decoder_step(feats[batches[0]][:1])
    flop1 = counter.get_total_flops()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.extract(torch.randn(1, 3, args.size, args.size))
    flop_enc = counter.get_total_flops()
    images = {b: torch.randn(b, 3, args.size, args.size) for b in batches}
    k, n = head.channels, max(getattr(head, "ffn_channels", 0) or 0, 1024)
    dt = torch.bfloat16 if args.precision == "bf16" else torch.float32
    mats = {b: (torch.randn(tokens * b, k, dtype=dt), torch.randn(k, n, dtype=dt)) for b in batches}
    step = {b: [] for b in batches}
    floor = {b: [] for b in batches}
    faults = {b: [] for b in batches}
    enc = {b: [] for b in batches}
    for r in range(args.rounds + 1):
        order = batches[r % len(batches):] + batches[:r % len(batches)]
        for b in order:
            a, w = mats[b]
            tf = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                a @ w
                tf = min(tf, time.perf_counter() - t)
            with torch.no_grad(), msda_impl("gather"), autocast(args.precision, "cpu"):
                t = time.perf_counter()
                model.extract(images[b])
                te = time.perf_counter() - t
                f0 = memstat.minor_faults()
                t = time.perf_counter()
                model.decoder_step(feats[b])
                ts = time.perf_counter() - t
                f1 = memstat.minor_faults()
            if r:
                enc[b].append(te)
                step[b].append(ts)
                floor[b].append(tf)
                faults[b].append(f1 - f0)
    rows = {}
    print(f"{args.config} {args.size}x{args.size}, {tokens} tokens/step, {args.precision}, "
          f"{torch.get_num_threads()} threads, {cpu_model()} ({' '.join(memstat.cpu_flags())}); "
          f"median of {args.rounds} interleaved rounds; step {flop1 / 1e9:.1f} GFLOP, encoder "
          f"{flop_enc / 1e9:.1f} GFLOP per image")
    print("batch | step s/image | step GFLOP/s | floor GFLOP/s (M = tokens x batch) | share | "
          "faults/step | encoder s/image | encoder GFLOP/s")
    for b in batches:
        s_img = statistics.median(step[b]) / b
        g = flop1 / s_img / 1e9
        fl = 2 * tokens * b * k * n / statistics.median(floor[b]) / 1e9
        e_img = statistics.median(enc[b]) / b
        rows[b] = {"step_s_per_image": s_img, "step_gflops": g, "floor_gflops": fl,
                   "share": g / fl, "faults": statistics.median(faults[b]),
                   "encoder_s_per_image": e_img, "step_s": step[b], "floor_s": floor[b],
                   "encoder_s": enc[b]}
        print(f"{b} | {s_img:.3f} | {g:.1f} | {fl:.1f} | {100 * g / fl:.0f} % | "
              f"{int(statistics.median(faults[b]))} | {e_img:.3f} | {flop_enc / e_img / 1e9:.1f}")
    b0 = batches[0]
    for b in batches[1:]:
        ratio = statistics.median(step[b0][i] * b / step[b][i] for i in range(args.rounds))
        print(f"images/s at batch {b} / batch {b0} (decoder step, per round): {ratio:.2f}")
    best = max(rows[b]["floor_gflops"] for b in batches) * 1e9
    one = rows[b0]["encoder_s_per_image"] + args.steps * rows[b0]["step_s_per_image"]
    bound = {"step": rows[b0]["step_s_per_image"] / (flop1 / best),
             f"{args.steps}-step prediction": one / ((flop_enc + args.steps * flop1) / best)}
    for what, v in bound.items():
        print(f"most any batch can gain on the {what} (batch-{b0} time / its FLOPs at the best "
              f"matmul rate of the run, {best / 1e9:.1f} GFLOP/s): {v:.2f}x")
    traffic(model, feats, args.precision)
    if args.out:
        Path(args.out).write_text(json.dumps({"config": args.config, "size": args.size,
                                              "cpu": cpu_model(), "rows": rows,
                                              "bound": bound}, indent=1))


MATRIX_OPS = {"mm", "addmm", "bmm", "baddbmm", "convolution", "_convolution",
              "mkldnn_convolution", "_mkldnn_convolution"}


class OpTraffic(TorchDispatchMode):
    """Seconds of the matrix products and of every other operation, and the other
    operations' bytes (tensor inputs + outputs; views move nothing and are skipped)."""

    def __init__(self):
        super().__init__()
        self.matrix_s = self.other_s = 0.0
        self.other_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        dt = time.perf_counter() - t
        if func.overloadpacket.__name__ in MATRIX_OPS:
            self.matrix_s += dt
        else:
            self.other_s += dt
            if not func.is_view:
                self.other_bytes += sum(x.numel() * x.element_size() for x in
                                        tree_leaves((args, kwargs, out))
                                        if isinstance(x, torch.Tensor))
        return out


def bandwidth(mib: int, repeats: int = 5) -> float:
    """GB/s of ``c = a + b`` on float32 arrays of ``mib`` MiB each (3 arrays moved), best of
    ``repeats``."""
    n = mib * 2**20 // 4
    a, b, c = torch.rand(n), torch.rand(n), torch.empty(n)
    best = float("inf")
    for _ in range(repeats + 1):
        t = time.perf_counter()
        torch.add(a, b, out=c)
        best = min(best, time.perf_counter() - t)
    return 3 * n * 4 / best / 1e9


def traffic(model, feats: dict, precision: str) -> None:
    """Print the per-image split of one decoder step per batch size (see the module doc)."""
    dram, l3 = bandwidth(256), bandwidth(4, repeats=50)
    print(f"memory bandwidth of c = a + b: {dram:.1f} GB/s at 3 x 256 MiB (DRAM), "
          f"{l3:.1f} GB/s at 3 x 4 MiB (in cache)")
    print("batch | matrix ops s/image | other ops s/image | other ops GB/image | their GB/s")
    for b, f in feats.items():
        with torch.no_grad(), msda_impl("gather"), autocast(precision, "cpu"):
            model.decoder_step(f)  # warm
            with OpTraffic() as tr:
                model.decoder_step(f)
        print(f"{b} | {tr.matrix_s / b:.3f} | {tr.other_s / b:.3f} | "
              f"{tr.other_bytes / b / 1e9:.2f} | {tr.other_bytes / tr.other_s / 1e9:.1f}")


if __name__ == "__main__":
    main()
