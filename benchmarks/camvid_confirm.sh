#!/usr/bin/env bash
# Issue #13, part 4: the CamVid confirmation of the generated-scene levers (RESULTS §11).
# Three models, the same CPU budget, SEEDS seeds each: the twin (camvid/twin_effnet_lite0.yaml),
# the official DDP recipe (camvid/ddp_effnet_lite0.yaml: scale 0.01, 3 steps) and the recipe
# chosen on the generated scenes (scale 0.1 + input preconditioning, 5 steps).
# Budget (shorter than §3's 600 x 8 so that 9 runs fit a 2-core session): SHORT_BUDGET in
# common.sh, 200 iterations of batch 4.
# Selection on val by the trainer (full 101 val images at the model's default steps,
# iterations 100 / 200); then, per DDP checkpoint, `diagnose` on the first 32 val images
# (map reliance, single-call controls, step curve) and one `eval` on test at 1/2/3/5/10 steps
# with all ten single-call controls (the conservative comparison: a step count counts as
# refinement only if it beats every single call); the twin: one eval on val and one on test.
# Usage: DENSEDIFF_CAMVID_ROOT=/path/to/CamVid [SEEDS="0 1 2"] [MODELS="twin official recipe"] \
#          [RUNS=folder] bash benchmarks/camvid_confirm.sh
# Summary: python benchmarks/summarize_levers.py benchmarks/runs/camvid_confirm
set -euo pipefail
source "$(dirname "$0")/common.sh"
declare -A CONFIG=([twin]=camvid/twin_effnet_lite0.yaml [official]=camvid/ddp_effnet_lite0.yaml
                   [recipe]=camvid/ddp_effnet_lite0.yaml)
declare -A EXTRA=([twin]="" [official]=""
                  [recipe]="model.diffusion.scale=0.1 model.diffusion.precondition=true model.diffusion.steps=5")
for s in ${SEEDS:-0 1 2}; do
  for name in ${MODELS:-twin official recipe}; do
    w=$R/camvid_confirm/${name}_seed$s
    ck=$w/checkpoints/best.safetensors
    if [ ! -f "$ck" ]; then
      # shellcheck disable=SC2086
      timed dd train "${CONFIG[$name]}" seed=$s work_dir=$w $SHORT_BUDGET ${EXTRA[$name]}
    fi
    if [ "$name" = twin ]; then
      [ -f $w/eval_val.json ] || dd eval $ck --split val --out $w/eval_val.json --quiet
      [ -f $w/eval_test.json ] || timed dd eval $ck --split test --out $w/eval_test.json --quiet
    else
      [ -f $w/diag_val.json ] || timed dd diagnose $ck --split val --limit 32 --out $w/diag_val.json --quiet
      [ -f $w/eval_test.json ] || timed dd eval $ck --split test --steps 1,2,3,5,10 \
        --out $w/eval_test.json --quiet
    fi
  done
done
