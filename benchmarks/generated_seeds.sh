#!/usr/bin/env bash
# Issue #13, part 4 on generated depth and BEV: DDP (official recipe) vs its non-diffusion twin,
# seeds 0 and 1 (SEEDS), at the demo budgets of RESULTS §10 (depth: generated/depth_ddp.yaml and
# depth_twin.yaml, 1000 iterations of batch 8; BEV: generated/bev_ddp.yaml and bev_twin.yaml,
# 300 iterations of batch 4). Selection on val by the trainer; every DDP checkpoint is read by
# `densediff diagnose` on the 32 val scenes (map reliance, single-call controls, step curve,
# fuse weights); test once: DDP at 1/3/5 steps with all ten single-call controls, the twin.
# Usage: [SEEDS="0 1"] [TASKS="depth bev"] [RUNS=folder] bash benchmarks/generated_seeds.sh
# Summary: python benchmarks/summarize_levers.py --full benchmarks/runs/seeds/<task>
set -euo pipefail
source "$(dirname "$0")/common.sh"
declare -A BUDGET=([depth]="train.iters=1000 train.eval_interval=500 train.ckpt_interval=500"
                   [bev]="train.iters=300 train.eval_interval=150 train.ckpt_interval=150")
for task in ${TASKS:-depth bev}; do
  for s in ${SEEDS:-0 1}; do
    for m in ddp twin; do
      w=$R/seeds/$task/${m}_seed$s
      # shellcheck disable=SC2086
      [ -f $w/checkpoints/best.safetensors ] || timed dd train generated/${task}_$m.yaml seed=$s \
        work_dir=$w train.progress=false ${BUDGET[$task]}
      if [ $m = ddp ]; then
        [ -f $w/diag_val.json ] || timed dd diagnose $w/checkpoints/best.safetensors --split val \
          --limit 32 --steps 1,3,5 --out $w/diag_val.json --quiet
        [ -f $w/eval_test.json ] || timed dd eval $w/checkpoints/best.safetensors --split test \
          --steps 1,3,5 --out $w/eval_test.json --quiet
      else
        [ -f $w/eval_test.json ] || dd eval $w/checkpoints/best.safetensors --split test \
          --out $w/eval_test.json --quiet
      fi
    done
  done
done
