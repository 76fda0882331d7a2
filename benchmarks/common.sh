# Shared set-up of the CamVid benchmark scripts (sourced, not run): repository root as the
# working folder, the Python to use ($PY), the CamVid folder ($DENSEDIFF_CAMVID_ROOT, default
# ../shared/...), the runs folder ($RUNS, git-ignored), and two helpers: `dd` runs the CLI,
# `timed` prints a command's wall time; SHORT_BUDGET: the reduced CamVid training budget of the
# issue #13 multi-seed runs (RESULTS §11), shared by camvid_confirm.sh and camvid_ddps_control.sh.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
: "${DENSEDIFF_CAMVID_ROOT:=../shared/datasets/camvid_segnet/CamVid}"
export DENSEDIFF_CAMVID_ROOT
R=${RUNS:-benchmarks/runs}  # where the runs go (git-ignored)
dd() { $PY -m densediff.cli.main "$@"; }
timed() { local s; s=$(date +%s); "$@"; echo "wall time of '$*': $(( $(date +%s) - s )) s"; }
SHORT_BUDGET="data.batch_size=4 train.iters=200 train.warmup_iters=25 train.eval_interval=100 \
train.ckpt_interval=100 train.log_interval=50 train.progress=false"
