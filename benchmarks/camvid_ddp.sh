#!/usr/bin/env bash
# DDP vs its non-diffusion twin on CamVid (CPU-sized configs), plus the self-aligned fine-tune.
# Each model is selected on val (best mIoU at its default steps); then val and, once, test are
# evaluated at 1/2/3/5/10 steps in one pass per split. Usage:
#   DENSEDIFF_CAMVID_ROOT=/path/to/CamVid [RUNS=folder] bash benchmarks/camvid_ddp.sh
set -euo pipefail
source "$(dirname "$0")/common.sh"
timed dd train camvid/ddp_effnet_lite0.yaml work_dir=$R/ddp_effnet_lite0 train.progress=false
timed dd train camvid/ddp_effnet_lite0_aligned.yaml work_dir=$R/ddp_effnet_lite0_aligned \
  train.load_from=$R/ddp_effnet_lite0 train.progress=false
timed dd train camvid/twin_effnet_lite0.yaml work_dir=$R/twin_effnet_lite0 train.progress=false
for run in ddp_effnet_lite0 ddp_effnet_lite0_aligned; do
  for split in val test; do
    timed dd eval $R/$run/checkpoints/best.safetensors --split $split --steps 1,2,3,5,10 \
      --out $R/$run/eval_best_$split.json --quiet
  done
done
for split in val test; do
  dd eval $R/twin_effnet_lite0/checkpoints/best.safetensors --split $split \
    --out $R/twin_effnet_lite0/eval_best_$split.json --quiet
done
