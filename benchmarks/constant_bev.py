"""The best constant BEV prediction of a BEV config's split (every cell positive for every
class: IoU = the class's share of cells), scored by the BEVFusion protocol.

    python benchmarks/constant_bev.py generated/bev_ddp.yaml --split test [overrides ...]
"""

from __future__ import annotations

import argparse
import json

from densediff.config import load_config
from densediff.data import build_dataset
from densediff.tasks.bev import constant_iou


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--split", default="test")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    ds = build_dataset(cfg, getattr(cfg.data, f"{args.split}_split", args.split), train=False)
    m = constant_iou([ds[i]["label"][None] for i in range(len(ds))], ds.class_names)
    print(json.dumps({"per_class": m["per_class"], "mIoU": m["mIoU"]}, indent=1))


if __name__ == "__main__":
    main()
