#!/usr/bin/env bash
# Latency split of DDP at the paper's ADE20K setting: Swin-T encoder + the 6-layer, 256-channel
# map decoder at 512x512 (16,384 tokens per decoder step), batch 1, and its non-diffusion twin.
# Reports the extra-step cost r = (t(3 steps) - t(1 step)) / (2 t(1 step)). Random weights (the
# cost does not depend on them). Usage: bash benchmarks/bench_ddp.sh [--device cuda] [--repeats N]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p benchmarks/runs
for cfg in ddp_swin_t twin_swin_t; do
  $PY -m densediff.cli.main bench ade20k/$cfg.yaml --size 512 512 --batch 1 --steps 1,3,5 \
    --repeats 5 --out benchmarks/runs/bench_${cfg}_512.json "$@"
done
