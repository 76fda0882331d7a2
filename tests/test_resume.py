"""A run SIGKILLed mid-way and resumed ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from densediff.testing.tiny import QUICK_BASELINE as TINY
from densediff.utils.checkpoint import load_metadata, load_weights

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, os, signal, sys
import densediff.engine.trainer as T
from densediff.tasks import load_config

overrides, resume, kill_at = json.loads(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
if kill_at:
    real_step, calls = T.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, like an OOM kill or preemption
        return real_step(*args, **kwargs)

    T.train_step = step
T.train(load_config("generated/baseline.yaml", overrides), resume=resume)
"""

# EMA, gradient accumulation, dropout, aux head and random augmentation all on: every random
# stream and every piece of state has to be restored for the weights to match exactly.
SETTINGS = TINY + ["train.iters=10", "train.ckpt_interval=4", "train.eval_interval=3",
                   "train.warmup_iters=2", "train.accum_steps=2", "train.ema.enabled=true",
                   "train.ema.decay=0.9", "train.log_interval=1", "model.head.dropout=0.3"]


def _train(work_dir: Path, *extra: str, resume: bool = False, kill_at: int = 0):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    args = json.dumps([f"work_dir={work_dir}", *SETTINGS, *extra])
    return subprocess.run([sys.executable, "-c", CHILD, args, str(int(resume)), str(kill_at)],
                          env=env, capture_output=True, text=True, timeout=120)


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    full, broken = tmp_path / "full", tmp_path / "broken"
    p = _train(full)
    assert p.returncode == 0, p.stderr[-2000:]

    p = _train(broken, kill_at=7)  # killed during iteration 7; last checkpoint: iteration 4
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert load_metadata(broken / "checkpoints/last.safetensors")["iteration"] == 4
    assert not list((broken / "checkpoints").glob(".*tmp*"))

    # resume with a data-loader worker: the data order must not depend on it
    p = _train(broken, "data.num_workers=1", resume=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resuming at iteration 4/10" in p.stdout
    assert "data.num_workers (0 -> 1)" in p.stdout  # the changed setting is reported

    for name in ("last.safetensors", "last_ema.safetensors", "best.safetensors"):
        a, _ = load_weights(full / "checkpoints" / name)
        b, _ = load_weights(broken / "checkpoints" / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs"
    raw, _ = load_weights(full / "checkpoints/last.safetensors")
    ema, _ = load_weights(full / "checkpoints/last_ema.safetensors")
    assert any(not torch.equal(raw[k], ema[k]) for k in raw if raw[k].is_floating_point())

    def rows(path):  # the logged losses, lr and metrics, without the timings
        with open(path) as f:
            return [{k: v for k, v in r.items() if "time" not in k} for r in csv.DictReader(f)]

    assert rows(broken / "metrics.csv") == rows(full / "metrics.csv")
