"""The oracle constant-depth predictor of a depth config's split: the single depth with the
lowest AbsRel on that split (fitted on the maps it is scored on), and its metrics.

    python benchmarks/constant_depth.py generated/depth_ddp.yaml --split test [overrides ...]
"""

from __future__ import annotations

import argparse
import json

from densediff.config import load_config
from densediff.data import build_dataset
from densediff.tasks.depth import best_constant_depth


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--split", default="test")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    ds = build_dataset(cfg, getattr(cfg.data, f"{args.split}_split", args.split), train=False)
    dd = cfg.data.depth
    depth, metrics = best_constant_depth([ds[i]["label"][None] for i in range(len(ds))],
                                         dd.min_depth, dd.max_depth, dd.eval_crop)
    print(json.dumps({"constant_depth": depth, **metrics}, indent=1))


if __name__ == "__main__":
    main()
