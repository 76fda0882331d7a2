#!/usr/bin/env bash
# Train a CamVid baseline on this machine, then evaluate its best (val-selected) checkpoint on
# val and, once, on test. Prints wall time. Usage:
#   DENSEDIFF_CAMVID_ROOT=/path/to/CamVid bash benchmarks/camvid_baseline.sh [CONFIG] [k=v ...]
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-configs/camvid/baseline_effnet_lite0.yaml}
shift || true
NAME=$(basename "$CONFIG" .yaml)
OUT=benchmarks/runs/$NAME
PY=${PY:-.venv/bin/python}
: "${DENSEDIFF_CAMVID_ROOT:=../shared/datasets/camvid_segnet/CamVid}"
export DENSEDIFF_CAMVID_ROOT
start=$(date +%s)
$PY -m densediff.cli.main train "$CONFIG" work_dir="$OUT" train.progress=false "$@"
end=$(date +%s)
echo "train wall time: $((end - start)) s"
for split in val test; do
  $PY -m densediff.cli.main eval "$OUT/checkpoints/best.safetensors" --split $split \
      --out "$OUT/eval_best_$split.json" --quiet
done
echo "total wall time: $(( $(date +%s) - start )) s"
