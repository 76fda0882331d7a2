#!/usr/bin/env bash
# Official parity (issue #22, RESULTS "Official parity"): random official DDP weights, saved with
# mmcv's save_checkpoint by the official code, converted by `densediff convert`, compared stage by
# stage and through each config's own test pipeline. Needs the CPU oracle of
# ../shared/tools/official-oracle (official repo + its venv) at $DENSEDIFF_ORACLE.
#
#   DENSEDIFF_ORACLE=/work/oracle bash benchmarks/official_parity.sh [oracle|parity|all] [extra]
#
# oracle: the official side only (dumps + .pth into $DUMPS); parity: densediff's side only
# (reads $DUMPS); all (default): both. Stage dumps include the float64 run of the same model
# (--fp64), which tells a mapping difference from float32 round-off. `extra` adds the S and B
# sizes and ConvNeXt-L aligned (stage dumps at 240x328 only; they share every code path with
# T and L). Environment: DUMPS (default $DENSEDIFF_ORACLE/parity), WORK (converted models,
# default /tmp/densediff_parity), TABLE (default benchmarks/runs/official_parity.md, the .json
# beside it). One thread each side, for reproducible numbers on a shared CPU; about 20 min
# (oracle) + 30 min (parity) on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
: "${DENSEDIFF_ORACLE:?set DENSEDIFF_ORACLE to the folder with venv/ and DDP/}"
export DENSEDIFF_ORACLE
OPY="$DENSEDIFF_ORACLE/venv/bin/python"
DUMPS=${DUMPS:-$DENSEDIFF_ORACLE/parity}
WORK=${WORK:-/tmp/densediff_parity}
TABLE=${TABLE:-benchmarks/runs/official_parity.md}
WHAT=${1:-all}
EXTRA=${2:-}
mkdir -p "$DUMPS" "$WORK" "$(dirname "$TABLE")"

ADE=_2x8_512x512_160k_ade20k
CS=_4x4_512x1024_160k_cityscapes
AL=_4x4_512x1024_5k_cityscapes_aligned

oracle() {  # name, then official_oracle.py options
  local name=$1; shift
  echo "== oracle $name $*"
  "$OPY" benchmarks/official_oracle.py "$name" --out "$DUMPS" --fp64 "$@" 2>&1 \
    | grep -v -e "Warning" -e "warnings.warn" -e "meshgrid" -e "^ *$" || true
}

if [[ $WHAT == oracle || $WHAT == all ]]; then
  # ADE20K (test: resize keep-ratio to (2048, 512), whole, accumulation): 256x256 is a multiple
  # of 32, 240x328 is not (240 = 7.5 x 32); the pipeline image 300x397 becomes 512x677; the
  # multi-scale + flip test on Swin-T with ratios 0.5, 0.75, 1.0 (CPU time; mmseg's full list
  # is 0.5 ... 1.75)
  oracle ddp_swin_t$ADE --sizes 256x256,240x328 --pipeline 300x397 --aug 0.5,0.75,1.0 --aug-flip
  oracle ddp_swin_l$ADE --sizes 256x256,240x328 --pipeline 300x397
  # Cityscapes (test: resize keep-ratio to (2048, 1024), whole, last step): the pipeline image
  # 100x1000 becomes 205x2048 (a 1:2 image would become 1024x2048: minutes per pass here)
  oracle ddp_convnext_t$CS --sizes 256x512,240x328 --pipeline 100x1000 --optimizer
  oracle ddp_convnext_l$CS --sizes 256x512,240x328 --pipeline 100x1000
  # the self-aligned fine-tune: 10 steps
  oracle ddp_convnext_t$AL --sizes 256x512,240x328 --pipeline 100x1000
  if [[ $EXTRA == extra ]]; then
    for s in s b; do
      oracle ddp_swin_${s}$ADE --sizes 240x328
      oracle ddp_convnext_${s}$CS --sizes 240x328
    done
    oracle ddp_convnext_l$AL --sizes 240x328
  fi
fi

if [[ $WHAT == parity || $WHAT == all ]]; then
  # densediff's side: convert every .pth in $DUMPS, compare; export + onnxruntime at 240x328
  # for Swin-T and ConvNeXt-T
  $PY benchmarks/official_parity.py --dumps "$DUMPS" --work "$WORK" --table "$TABLE" \
    --onnx "ddp_swin_t$ADE:240x328,ddp_convnext_t$CS:240x328"
fi
