#!/usr/bin/env bash
# Issue #13, part 4, DDPS: the paper's Table 7 control on CamVid. One frozen base (the CPU
# baseline, camvid/baseline_effnet_lite0.yaml, seed 0), then per seed (SEEDS, default 0 1) the
# DDPS model (camvid/ddps_effnet_lite0.yaml) and its no-diffusion control
# (camvid/ddps_effnet_lite0_control.yaml: the same UNet-T + classifier as extra head layers,
# zero mask input, one call), all at SHORT_BUDGET (common.sh). Selection on val by the trainer;
# test once: DDPS at 0 (= the base) / 1 / 5 steps, the control at 0 / 1.
# Usage: DENSEDIFF_CAMVID_ROOT=/path/to/CamVid [SEEDS="0 1"] [RUNS=folder] \
#          bash benchmarks/camvid_ddps_control.sh
# Summary: python benchmarks/summarize_levers.py --full benchmarks/runs/camvid_ddps
set -euo pipefail
source "$(dirname "$0")/common.sh"
D=$R/camvid_ddps
base=$D/base
# shellcheck disable=SC2086
[ -f $base/checkpoints/best.safetensors ] || \
  timed dd train camvid/baseline_effnet_lite0.yaml seed=0 work_dir=$base $SHORT_BUDGET
declare -A CONFIG=([ddps]=camvid/ddps_effnet_lite0.yaml [control]=camvid/ddps_effnet_lite0_control.yaml)
declare -A STEPS=([ddps]=0,1,5 [control]=0,1)
for s in ${SEEDS:-0 1}; do
  for name in ddps control; do
    w=$D/${name}_seed$s
    # shellcheck disable=SC2086
    [ -f $w/checkpoints/best.safetensors ] || timed dd train "${CONFIG[$name]}" seed=$s \
      work_dir=$w model.ddps.base=$base $SHORT_BUDGET
    [ -f $w/eval_test.json ] || timed dd eval $w/checkpoints/best.safetensors --split test \
      --steps ${STEPS[$name]} --out $w/eval_test.json --quiet
  done
done
