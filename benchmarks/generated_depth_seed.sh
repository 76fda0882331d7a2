#!/usr/bin/env bash
# A second seed of the generated-scene depth comparison (benchmarks/generated_depth.sh): the same
# configs with seed=SEED (default 1: other initial weights, data order, augmentation and
# evaluation noise; the scenes themselves are the same), selected on val, test once at 1/3/5
# steps. Usage: [SEED=1] [RUNS=folder] bash benchmarks/generated_depth_seed.sh
set -euo pipefail
source "$(dirname "$0")/common.sh"
S=${SEED:-1}
for m in ddp twin; do
  timed dd train generated/depth_$m.yaml seed=$S work_dir=$R/depth_${m}_seed$S train.progress=false
done
for split in val test; do
  dd eval $R/depth_ddp_seed$S/checkpoints/best.safetensors --split $split --steps 1,3,5 \
    --out $R/depth_ddp_seed$S/eval_best_$split.json --quiet
  dd eval $R/depth_twin_seed$S/checkpoints/best.safetensors --split $split \
    --out $R/depth_twin_seed$S/eval_best_$split.json --quiet
done
