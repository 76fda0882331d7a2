#!/usr/bin/env bash
# Issue #16 evidence, one job after the other on an otherwise idle machine:
#  1. `densediff bench` at the paper's setting (Swin-T + the 6-layer, 256-ch map decoder at
#     512x512), variants eager (today) / fast (the defaults + bf16 where native) / onnxruntime,
#     interleaved; batch 1/4/8 throughput;
#  2. one training iteration of DDP and its twin (today / default / bf16), interleaved;
#  3. the torch.compile variant with its compile time;
#  4. accuracy of the fast paths on trained checkpoints (CKPTS="a.safetensors b.safetensors",
#     CamVid ones need DENSEDIFF_CAMVID_ROOT), val split.
# Usage: [CKPTS="..."] bash benchmarks/cpu_speed.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/runs/cpu_speed}
mkdir -p "$OUT"
$PY -m densediff.cli.main bench ade20k/ddp_swin_t.yaml --size 512 512 --steps 1,3,5 \
  --repeats 5 --variants eager,fast,onnx --batches 1,4,8 --out "$OUT/bench_ddp_swin_t_512.json"
$PY benchmarks/train_step.py --rounds 3 --out "$OUT/train_step_swin_t_512.json"
$PY -m densediff.cli.main bench ade20k/ddp_swin_t.yaml --size 512 512 --steps 1,3 \
  --repeats 3 --variants fast,compiled --out "$OUT/bench_compiled_512.json"
if [ -n "${CKPTS:-}" ]; then
  # shellcheck disable=SC2086
  $PY benchmarks/precision_accuracy.py $CKPTS --split val --steps 1,3 --out "$OUT/precision_val.json"
fi
