#!/usr/bin/env bash
# The camera + LiDAR ("C+L") variant of benchmarks/generated_bev.sh: generated/bev_ddp_lidar.yaml
# (the same model plus the pillar branch on a simulated 32-beam LiDAR), 1200 iterations, val
# every 300; the best-on-val checkpoint evaluated on val and, once, test at 1 and 3 steps.
# Usage: [RUNS=folder] bash benchmarks/generated_bev_lidar.sh
set -euo pipefail
source "$(dirname "$0")/common.sh"
timed dd train generated/bev_ddp_lidar.yaml work_dir=$R/bev_ddp_lidar train.iters=1200 \
  train.eval_interval=300 train.ckpt_interval=300 train.progress=false
for split in val test; do
  dd eval $R/bev_ddp_lidar/checkpoints/best.safetensors --split $split --steps 1,3 \
    --out $R/bev_ddp_lidar/eval_best_$split.json --quiet
done
