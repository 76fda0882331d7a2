#!/usr/bin/env bash
# BEV map segmentation on the built-in generated world: DDP (camera-only) vs its non-diffusion
# twin (CPU-sized configs generated/bev_ddp.yaml and bev_twin.yaml, ITERS iterations each,
# default 1200). Each model is selected on val (best mIoU, DDP at its default 3 steps); then val
# and, once, test are evaluated (DDP at 1 and 3 steps in one pass per split, with the
# uncertainty AUROCs); the best constant prediction is the floor to beat.
# Usage: [RUNS=folder] [ITERS=1200] bash benchmarks/generated_bev.sh
set -euo pipefail
source "$(dirname "$0")/common.sh"
ITERS=${ITERS:-1200}
for m in ddp twin; do
  timed dd train generated/bev_$m.yaml work_dir=$R/bev_$m train.iters=$ITERS \
    train.eval_interval=300 train.ckpt_interval=300 train.progress=false
done
for split in val test; do
  timed dd eval $R/bev_ddp/checkpoints/best.safetensors --split $split --steps 1,3 \
    --out $R/bev_ddp/eval_best_$split.json --quiet
  dd eval $R/bev_twin/checkpoints/best.safetensors --split $split \
    --out $R/bev_twin/eval_best_$split.json --quiet
done
$PY benchmarks/constant.py generated/bev_ddp.yaml --split test
