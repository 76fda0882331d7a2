#!/usr/bin/env bash
# Issue #13, DDPS: the paper's Table 7 control on the built-in generated scenes (the CamVid
# version, camvid_ddps_control.sh, runs at ~20 s/iteration on this 2-core CPU when shared: not
# feasible in one session). One frozen base (generated/baseline.yaml, seed 0, 1000 iterations),
# then per seed (SEEDS, default 0 1) DDPS (generated/ddps.yaml) and its no-diffusion control
# (generated/ddps_control.yaml: the same UNet + classifier as extra head layers, zero mask input,
# one call), 600 iterations each. Selection on val by the trainer; test once: DDPS at 0 (= the
# base) / 1 / 5 steps, the control at 0 / 1.
# Usage: [SEEDS="0 1"] [RUNS=folder] bash benchmarks/generated_ddps_control.sh
# Summary: python benchmarks/summarize_levers.py --full benchmarks/runs/gen_ddps
set -euo pipefail
source "$(dirname "$0")/common.sh"
D=$R/gen_ddps
base=$D/base
[ -f $base/checkpoints/best.safetensors ] || \
  timed dd train generated/baseline.yaml seed=0 work_dir=$base train.progress=false
declare -A CONFIG=([ddps]=generated/ddps.yaml [control]=generated/ddps_control.yaml)
declare -A STEPS=([ddps]=0,1,5 [control]=0,1)
for s in ${SEEDS:-0 1}; do
  for name in ddps control; do
    w=$D/${name}_seed$s
    [ -f $w/checkpoints/best.safetensors ] || timed dd train "${CONFIG[$name]}" seed=$s \
      work_dir=$w model.ddps.base=$base train.progress=false
    [ -f $w/eval_test.json ] || timed dd eval $w/checkpoints/best.safetensors --split test \
      --steps ${STEPS[$name]} --out $w/eval_test.json --quiet
  done
done
