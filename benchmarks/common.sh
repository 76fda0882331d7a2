# Shared set-up of the CamVid benchmark scripts (sourced, not run): repository root as the
# working folder, the Python to use ($PY), the CamVid folder ($DENSEDIFF_CAMVID_ROOT, default
# ../shared/...), the runs folder ($RUNS, git-ignored), and two helpers: `dd` runs the CLI,
# `timed` prints a command's wall time.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
: "${DENSEDIFF_CAMVID_ROOT:=../shared/datasets/camvid_segnet/CamVid}"
export DENSEDIFF_CAMVID_ROOT
R=${RUNS:-benchmarks/runs}  # where the runs go (git-ignored)
dd() { $PY -m densediff.cli.main "$@"; }
timed() { local s; s=$(date +%s); "$@"; echo "wall time of '$*': $(( $(date +%s) - s )) s"; }
