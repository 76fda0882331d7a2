#!/usr/bin/env bash
# Issue #13 lever exploration on the generated shape scenes (configs/generated/ddp.yaml, the
# `make demo` model: 1000 iterations of batch 8 on 2 CPU cores, ~4 min each). Every recipe is
# trained with the same budget and seed, then diagnosed on the 32 val scenes (map reliance,
# single-call controls, the 1/2/3/5/10-step curve): `densediff diagnose`. The twin is the
# same model without diffusion (model.type=segmentor). Selection is on val only.
# With TEST=1 the val-selected checkpoints are also evaluated once on the 32 test scenes at
# 1/2/3/5/10 steps (with the single-call controls). Summary: benchmarks/summarize_levers.py.
# Usage: [SEED=0] [TEST=1] [RUNS=folder] [RECIPES="official twin ..."] bash benchmarks/ddp_levers_generated.sh
set -euo pipefail
source "$(dirname "$0")/common.sh"
S=${SEED:-0}
declare -A RECIPE=(
  [official]=""
  [twin]="model.type=segmentor"
  [selfcond]="model.diffusion.self_condition=true"
  [precond_s0.1]="model.diffusion.scale=0.1 model.diffusion.precondition=true"
  [precond_s0.1_selfcond]="model.diffusion.scale=0.1 model.diffusion.precondition=true model.diffusion.self_condition=true"
  [recipe]="model.diffusion.scale=0.1 model.diffusion.precondition=true model.diffusion.steps=5"
  [precond_s0.1_selfcond_t2]="model.diffusion.scale=0.1 model.diffusion.precondition=true model.diffusion.self_condition=true model.diffusion.train_time_power=2 model.diffusion.sample_start=0.999 train.map_lr_mult=3"
)
for name in ${RECIPES:-official twin selfcond precond_s0.1 precond_s0.1_selfcond precond_s0.1_selfcond_t2}; do
  w=$R/levers/${name}_seed$S
  if [ ! -f "$w/checkpoints/best.safetensors" ]; then
    # shellcheck disable=SC2086
    timed dd train generated/ddp.yaml seed=$S work_dir=$w train.progress=false ${RECIPE[$name]}
  fi
  if [ "$name" = twin ]; then
    dd eval $w/checkpoints/best.safetensors --split val --out $w/eval_val.json --quiet
    if [ "${TEST:-0}" = 1 ]; then
      dd eval $w/checkpoints/best.safetensors --split test --out $w/eval_test.json --quiet
    fi
  else
    dd diagnose $w/checkpoints/best.safetensors --split val --limit 32 --out $w/diag_val.json --quiet
    if [ "${TEST:-0}" = 1 ]; then
      dd eval $w/checkpoints/best.safetensors --split test --steps 1,2,3,5,10 \
        --out $w/eval_test.json --quiet
    fi
  fi
done
