"""The floor a model of a config must beat on a split: the best constant prediction, scored on
the maps it is fitted to.

- depth: the single depth with the lowest AbsRel on the split (oracle), and its metrics;
- BEV: every cell positive for every class (IoU = the class's share of cells; predicting
  nothing scores 0), by the BEVFusion protocol.

    python benchmarks/constant.py generated/depth_ddp.yaml --split test [overrides ...]
    python benchmarks/constant.py generated/bev_ddp.yaml --split test
"""

from __future__ import annotations

import argparse
import json

from densediff.criteria.bev import constant_iou
from densediff.criteria.depth import best_constant_depth
from densediff.tasks import build_dataset, load_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--split", default="test")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    ds = build_dataset(cfg, getattr(cfg.data, f"{args.split}_split", args.split), train=False)
    labels = [ds[i]["label"][None] for i in range(len(ds))]
    if cfg.task == "bev":
        m = constant_iou(labels, ds.class_names)
        out = {"per_class": m["per_class"], "mIoU": m["mIoU"]}
    elif cfg.task == "depth":
        dd = cfg.data.depth
        depth, metrics = best_constant_depth(labels, dd.min_depth, dd.max_depth, dd.eval_crop)
        out = {"constant_depth": depth, **metrics}
    else:
        raise SystemExit(f"{args.config}: task {cfg.task!r} has no constant floor here")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
