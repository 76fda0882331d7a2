"""class_ids (``max(1).indices``) against ``argmax(1)`` on a CamVid-sized score map.

Interleaved: each round times both once (order alternating), ROUNDS rounds; prints the median
and the spread (min-max) of each and the per-round ratio. Usage:
    python benchmarks/class_ids_bench.py [ROUNDS]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from densediff.criteria.segmentation import class_ids


def main(rounds: int = 30) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 12, 360, 480)  # 1 image, 11 classes + void, original CamVid size
    fns = {"argmax(1)": lambda: x.argmax(1), "class_ids": lambda: class_ids(x)}
    assert torch.equal(fns["argmax(1)"](), fns["class_ids"]())
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for k in order:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    for k, v in times.items():
        print(f"{k:10s} median {statistics.median(v) * 1e3:7.2f} ms "
              f"(min {min(v) * 1e3:.2f}, max {max(v) * 1e3:.2f})")
    ratios = [a / b for a, b in zip(times["argmax(1)"], times["class_ids"])]
    print(f"argmax / class_ids per round: median {statistics.median(ratios):.1f}x "
          f"(min {min(ratios):.1f}, max {max(ratios):.1f}); threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
