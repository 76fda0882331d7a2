"""The most any batch can gain per image (issue #26, part 3), mechanism by mechanism.

An image in a batch of b goes through the same elements and the same instructions as the
image alone. A batch can make its prediction cheaper per image in only these ways, each
measured here on whole ``--steps``-step predictions of a config's model (random weights; the
fast path: gather attention, no-mmap malloc, fp32) at ``--size``:

F. **Costs paid once per call**, which the batch shares (Python, operator dispatch,
   allocation, starting the threads of a parallel operation, and work that depends on the
   image size but not on the batch, such as reference points and position encodings).
   Bounded from above by the time of the whole prediction of a ``--tiny`` image (its work is
   close to nothing) plus the number of operations of the full-size prediction times the
   time of the smallest operation that runs on all threads (an in-cache add of 2^16 floats:
   dispatch, thread start-up and join) plus S, the seconds of the operations (matrix
   products aside) whose output at batch b is smaller than b times their output at batch 1,
   each timed in the batch-1 prediction (the two predictions' operations aligned by name; one
   without a partner counts as shared); these terms count the dispatch more than once, so F
   is overestimated.
M. **Matrix-kernel efficiency**, which depends on a product's shape. Every matrix product
   (mm, addmm, bmm, convolution, fused attention) of the batch-1 prediction and of the batch-b
   one (the whole batch through each product) is recorded, and each distinct pair is replayed
   alone on fresh tensors of the recorded shapes and strides, best of ``--repeats`` calls
   (the two shapes' calls alternating).
   M sums, over the products, what the batch shape saves per image where it is faster (where
   it is slower an implementation would keep the image's own shape, so the bound takes the
   better of the two for every product). Weights read once per call are inside M: a replayed
   batch product reads its weights once.
P. **Parallelism across images**: two images at once, each on one thread, against one image
   on both threads (the batch-1 time): P = what that saves per image, where it saves.

Everything else (elementwise operations, norms, softmax, gathers, resizes, the sampler's
noise) moves b times the bytes for b times the elements, per image the same; a batch only
pushes the working set out of the caches. So no implementation of a batch of b can beat
``t1 / (t1 - (1 - 1/b) F - M - P)`` times the batch-1 images/s, where t1 is the batch-1 time
per image. Every round measures all of it, interleaved (each prediction the best of
``--best`` calls, so that one burst of a shared machine does not make a round), with the
batch-b images/s actually measured (whole-batch kernels, and the bit-identical
``batch_invariant`` path that ``predict`` runs); the script prints the bound from the
medians over rounds, the bound of every round, and the matrix products that gain most.

Usage: python benchmarks/batch_bound.py [CONFIG] [--size 512] [--tiny 64] [--batch 4]
       [--steps 3] [--rounds 3] [--repeats 3] [--best 2] [--out results.json]
"""

from __future__ import annotations

import argparse
import difflib
import json
import statistics
import threading
import time
from collections import Counter
from pathlib import Path

import fast_path
import torch
from batch_roofline import MATRIX_OPS  # the matrix products' aten names (benchmarks/)
from fast_path import random_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from densediff.utils import memstat
from densediff.utils.precision import cpu_model


def is_matrix(func) -> bool:
    name = func.overloadpacket.__name__
    return name in MATRIX_OPS or "attention" in name


class Recorder(TorchDispatchMode):
    """Counts every operation, records its name and output size (``trace``) and, with
    ``timed``, its seconds (``seconds``); records each matrix product as ``(func, spec)``, its
    tensors replaced by ``("T", shape, stride, dtype)``."""

    def __init__(self, timed: bool = False):
        super().__init__()
        self.timed = timed
        self.trace: list[tuple[str, int]] = []
        self.seconds: list[float] = []
        self.products: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if is_matrix(func):
            spec = tree_map(lambda x: ("T", tuple(x.shape), tuple(x.stride()), x.dtype)
                            if isinstance(x, torch.Tensor) else x, (args, kwargs))
            self.products.append((func, spec))
        t = time.perf_counter()
        out = func(*args, **kwargs)
        if self.timed:
            self.seconds.append(time.perf_counter() - t)
        self.trace.append((func.overloadpacket.__name__,
                           sum(x.numel() for x in tree_leaves(out) if isinstance(x, torch.Tensor))))
        return out


def materialize(spec):
    """Fresh random tensors for the ``("T", shape, stride, dtype)`` leaves of ``spec``."""

    def make(x):
        if not (isinstance(x, tuple) and len(x) == 4 and x[0] == "T"):
            return x
        _, shape, stride, dtype = x
        n = 1 + sum((s - 1) * st for s, st in zip(shape, stride)) if all(shape) else 0
        return torch.randn(max(n, 1)).to(dtype).as_strided(shape, stride)

    return tree_map(make, spec, is_leaf=lambda x: isinstance(x, tuple) and len(x) == 4
                    and x[0] == "T")


def replay(func, spec1, specb, repeats: int) -> tuple[float, float]:
    """Best seconds of ``repeats`` calls of ``func`` on fresh tensors made from ``spec1`` and
    from ``specb``, the calls alternating (a burst of a shared machine slows both alike)."""
    one, big = materialize(spec1), materialize(specb)
    best = [float("inf"), float("inf")]
    with torch.no_grad():
        for _ in range(repeats):
            for k, (args, kwargs) in enumerate((one, big)):
                t = time.perf_counter()
                func(*args, **kwargs)
                best[k] = min(best[k], time.perf_counter() - t)
    return best[0], best[1]


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", nargs="?", default="ade20k/ddp_swin_t.yaml")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--tiny", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--best", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args()
    b, n, best = args.batch, args.steps, args.best
    _, model = random_model(args.config)
    threads = torch.get_num_threads()
    x1 = torch.randn(1, 3, args.size, args.size)
    xb = torch.randn(b, 3, args.size, args.size)
    tiny = torch.randn(1, 3, args.tiny, args.tiny)
    pair = [torch.randn(1, 3, args.size, args.size) for _ in range(2)]

    def predict(x, exact=False):
        return fast_path.predict(model, x, n, exact)

    recs = {}
    for key, x in (("1", x1), ("b", xb)):
        predict(x)  # warm
        with Recorder() as rec:
            predict(x)
        recs[key] = rec
    one, big = recs["1"].products, recs["b"].products
    if [f for f, _ in one] != [f for f, _ in big]:
        raise SystemExit("the batch-1 and batch-b predictions run different matrix products")
    pairs = Counter((f, repr(s1), repr(sb)) for (f, s1), (_, sb) in zip(one, big))
    specs = {(f, repr(s1), repr(sb)): (f, s1, sb) for (f, s1), (_, sb) in zip(one, big)}
    ops = len(recs["1"].trace)
    # S: operations (not matrix products) whose output does not grow with the batch, e.g. the
    # reference points and position encodings of a map size: work a batch does once. The two
    # traces are aligned by operation name (a batch adds a few copies, e.g. a reshape that
    # must copy, and per-image noise); an operation of the batch-1 trace without a partner
    # counts as shared (an overestimate)
    t1_ops, tb_ops = recs["1"].trace, recs["b"].trace
    shared = []
    matcher = difflib.SequenceMatcher(None, [o for o, _ in t1_ops], [o for o, _ in tb_ops],
                                      autojunk=False)
    for tag, i0, i1, j0, _ in matcher.get_opcodes():
        for i in range(i0, i1):
            o, n1 = t1_ops[i]
            if o in MATRIX_OPS or "attention" in o:
                continue
            if tag != "equal" or tb_ops[j0 + i - i0][1] < b * n1:
                shared.append(i)

    a, c, out = torch.rand(2**16), torch.rand(2**16), torch.empty(2**16)

    def pair_parallel() -> float:
        def work(x):
            torch.set_num_threads(1)
            predict(x)

        torch.set_num_threads(1)
        ts = [threading.Thread(target=work, args=(x,)) for x in pair]
        t = time.perf_counter()
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        dt = time.perf_counter() - t
        torch.set_num_threads(threads)
        return dt

    shared_time: Counter = Counter()  # seconds per operation name, summed over calls

    def shared_seconds() -> float:
        with Recorder(timed=True) as rec:
            predict(x1)
        for i in shared:
            shared_time[rec.trace[i][0]] += rec.seconds[i]
        return sum(rec.seconds[i] for i in shared)

    keys = ["t1", "tb_whole", "tb_exact", "tiny", "par_op", "pair", "S"]
    log: dict[str, list[float]] = {k: [] for k in keys + ["M1", "Mb", "M", "bound"]}
    gains: Counter = Counter()
    for r in range(args.rounds + 1):
        got = {}
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for k in order:
            if k == "t1":
                got[k] = best_of(lambda: predict(x1), best)
            elif k == "tb_whole":
                got[k] = best_of(lambda: predict(xb), best) / b
            elif k == "tb_exact":
                got[k] = best_of(lambda: predict(xb, exact=True), best) / b
            elif k == "tiny":
                got[k] = best_of(lambda: predict(tiny), args.repeats)
            elif k == "par_op":
                got[k] = statistics.median(
                    best_of(lambda: torch.add(a, c, out=out), 20) for _ in range(5))
            elif k == "S":
                got[k] = min(shared_seconds() for _ in range(best))
            else:
                got[k] = min(pair_parallel() for _ in range(best)) / 2
        if not r:
            continue  # warm-up round (the replays warm themselves: best of --repeats)
        m1 = mb = save = 0.0
        for key, count in pairs.items():
            f, s1, sb = specs[key]
            t1, tb = replay(f, s1, sb, args.repeats)
            tb /= b
            m1 += count * t1
            mb += count * tb
            save += count * max(0.0, t1 - tb)
            gains[key] += count * (t1 - tb)
        for k in keys:
            log[k].append(got[k])
        fixed = got["tiny"] + ops * got["par_op"] + got["S"]
        par = max(0.0, got["t1"] - got["pair"])
        log["M1"].append(m1)
        log["Mb"].append(mb)
        log["M"].append(save)
        log["bound"].append(got["t1"] / (got["t1"] - (1 - 1 / b) * fixed - save - par))

    med = {k: statistics.median(v) for k, v in log.items()}
    fixed = med["tiny"] + ops * med["par_op"] + med["S"]
    calls = sum(1 for k in keys if k == "S") * best * (args.rounds + 1)
    top = ", ".join(f"{k} {v / calls * 1e3:.1f} ms" for k, v in shared_time.most_common(4))
    print(f"{args.config} {args.size}x{args.size}, {n}-step predictions, batch {b} against 1; "
          f"fp32, {threads} threads, {cpu_model()} ({' '.join(memstat.cpu_flags())}); median of "
          f"{args.rounds} interleaved rounds (after one warm-up round), each prediction the "
          f"best of {best} calls")
    print(f"t1, batch-1 prediction: {med['t1']:.3f} s/image; measured batch {b}: "
          f"{med['tb_whole']:.3f} s/image whole-batch kernels, {med['tb_exact']:.3f} "
          f"bit-identical (batch_invariant)")
    print(f"F, once-per-call costs <= {fixed * 1e3:.0f} ms: {args.tiny}x{args.tiny} prediction "
          f"{med['tiny'] * 1e3:.0f} ms + {ops} operations x {med['par_op'] * 1e6:.1f} us "
          f"(smallest all-thread add) + {med['S'] * 1e3:.0f} ms of {len(shared)} operations whose "
          f"output does not grow with the batch ({top}); a batch of {b} saves (1 - 1/{b}) F = "
          f"{(1 - 1 / b) * fixed * 1e3:.0f} ms/image")
    print(f"M, matrix products ({len(one)} calls, {len(pairs)} distinct): "
          f"{med['M1']:.3f} s/image at batch 1, {med['Mb']:.3f} s/image at batch {b}; the "
          f"better shape per product saves {med['M'] * 1e3:.0f} ms/image")
    print(f"P, two images at once on one thread each: {med['pair']:.3f} s/image; saves "
          f"{max(0.0, med['t1'] - med['pair']) * 1e3:.0f} ms/image")
    ratio = lambda k: statistics.median(t / u for t, u in zip(log["t1"], log[k]))  # noqa: E731
    print(f"measured images/s, batch {b} / batch 1 (median of per-round ratios): "
          f"{ratio('tb_whole'):.2f} whole-batch kernels, {ratio('tb_exact'):.2f} bit-identical")
    whole = med["t1"] / (med["t1"] - (1 - 1 / b) * fixed - med["M"]
                         - max(0.0, med["t1"] - med["pair"]))
    print(f"bound, the most any batch of {b} can gain: x{whole:.2f} from the medians above; per "
          f"round {' / '.join(f'x{v:.2f}' for v in log['bound'])} (largest "
          f"x{max(log['bound']):.2f})")
    print("matrix products whose batch shape gains most (ms/image over the rounds, summed; "
          "count x op: batch-1 shapes):")
    for key, g in gains.most_common(5):
        f, s1, _ = specs[key]
        shapes = [x[1] for x in tree_leaves_spec(s1)]
        print(f"  {g / args.rounds * 1e3:+.1f}  {pairs[key]} x {f.overloadpacket.__name__}: "
              f"{shapes}")
    if args.out:
        Path(args.out).write_text(json.dumps({"config": args.config, "size": args.size,
                                              "batch": b, "steps": n, "cpu": cpu_model(),
                                              "ops": ops, "log": log}, indent=1))


def tree_leaves_spec(spec) -> list:
    """The ``("T", shape, stride, dtype)`` leaves of a recorded spec."""
    out = []

    def visit(x):
        if isinstance(x, tuple) and len(x) == 4 and x[0] == "T":
            out.append(x)
        elif isinstance(x, (list, tuple)):
            for y in x:
                visit(y)
        elif isinstance(x, dict):
            for y in x.values():
                visit(y)

    visit(spec)
    return out


if __name__ == "__main__":
    main()
