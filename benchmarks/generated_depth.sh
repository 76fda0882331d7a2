#!/usr/bin/env bash
# Depth on the built-in generated 3-D scenes: DDP vs its non-diffusion twin (CPU-sized configs
# generated/depth_ddp.yaml and depth_twin.yaml). Each model is selected on val (best AbsRel at
# its default 3 steps); then val and, once, test are evaluated at 1/3/5 steps in one pass per
# split, with the uncertainty scores of the step spread; DDP is also evaluated with 4 random
# starts per image (uncertainty = spread over starts); the oracle constant-depth predictor is
# the floor to beat. Usage: [RUNS=folder] bash benchmarks/generated_depth.sh
set -euo pipefail
source "$(dirname "$0")/common.sh"
timed dd train generated/depth_ddp.yaml work_dir=$R/depth_ddp train.progress=false
timed dd train generated/depth_twin.yaml work_dir=$R/depth_twin train.progress=false
for split in val test; do
  timed dd eval $R/depth_ddp/checkpoints/best.safetensors --split $split --steps 1,3,5 \
    --out $R/depth_ddp/eval_best_$split.json --quiet
  dd eval $R/depth_twin/checkpoints/best.safetensors --split $split \
    --out $R/depth_twin/eval_best_$split.json --quiet
done
timed dd eval $R/depth_ddp/checkpoints/best.safetensors model.diffusion.randsteps=4 --split test \
  --steps 1,3,5 --out $R/depth_ddp/eval_best_test_randsteps4.json --quiet
$PY benchmarks/constant.py generated/depth_ddp.yaml --split test
