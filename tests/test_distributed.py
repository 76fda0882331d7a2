"""Two CPU processes under torchrun (gloo): the run finishes, rank 0 alone writes, ranks agree."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from densediff.testing import tiny
from densediff.testing.tiny import QUICK_BASELINE as TINY
from densediff.utils.checkpoint import load_metadata, load_weights

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, os, sys
import densediff.engine.trainer as T
from densediff.tasks import load_config
from densediff.utils.distributed import unwrap
from safetensors.torch import save_file

overrides, out = json.loads(sys.argv[1]), sys.argv[2]
seen = []
real_step = T.train_step

def step(model, *args, **kwargs):
    seen[:] = [model]
    return real_step(model, *args, **kwargs)

T.train_step = step
metrics = T.train(load_config("generated/baseline.yaml", overrides))
rank = os.environ["RANK"]
state = {k: v.contiguous() for k, v in unwrap(seen[0]).state_dict().items()}
save_file(state, f"{out}/rank{rank}.safetensors")
with open(f"{out}/metrics{rank}.json", "w") as f:
    json.dump({k: v for k, v in metrics.items() if not isinstance(v, list)}, f)
"""


def torchrun_two(child: str, overrides: list[str] | dict, tmp_path: Path) -> None:
    """Run ``child`` (a script taking ``overrides`` as JSON and an output folder) in two
    torchrun processes; fail with the tail of their output."""
    script = tmp_path / "child.py"
    script.write_text(child)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", str(script), json.dumps(overrides),
                        str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]


def test_torchrun_two_processes(tmp_path):
    wd = tmp_path / "w"
    overrides = [f"work_dir={wd}", *TINY, "train.iters=4", "train.ckpt_interval=4",
                 "train.eval_interval=2", "train.log_interval=1", "train.accum_steps=2",
                 "data.gen_num_val=5"]  # odd: the two val shards differ in size
    torchrun_two(CHILD, overrides, tmp_path)

    # both ranks hold the same weights (buffers included), and rank 0 saved them
    saved, _ = load_weights(wd / "checkpoints/last.safetensors")
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    assert saved.keys() == ranks[0].keys() == ranks[1].keys()
    for k in saved:
        assert torch.equal(ranks[0][k], ranks[1][k]) and torch.equal(saved[k], ranks[0][k]), k
    assert load_metadata(wd / "checkpoints/last.safetensors")["iteration"] == 4

    # one writer: each iteration logged once; the 2 x 2 x 2 samples per step were consumed
    rows = list(csv.DictReader(open(wd / "metrics.csv")))
    assert [int(r["iter"]) for r in rows if r["loss"]] == [1, 2, 3, 4]
    assert [int(r["iter"]) for r in rows if r["mIoU"]] == [2, 4]
    assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == [
        "best.safetensors", "last.safetensors", "last.state.pt"]
    m0, m1 = ((tmp_path / f"metrics{r}.json").read_text() for r in (0, 1))
    assert m0 == m1 and "mIoU" in m0  # the sharded evaluation was reduced over both ranks


EVAL_CHILD = """
import json, sys
import torch
from densediff.tasks import load_config
from densediff.tasks import build_dataset
from densediff.utils import distributed as du
from densediff.engine.evaluate import evaluate_steps
from densediff.tasks import build_model

spec, out = json.loads(sys.argv[1]), sys.argv[2]
torch.distributed.init_process_group("gloo")
cfg = load_config(spec["config"], spec["overrides"])
torch.manual_seed(0)
model = build_model(cfg, spec["classes"])
res = evaluate_steps(model, build_dataset(cfg, "val", train=False), cfg, [1, 3], progress=False)
if du.rank() == 0:
    json.dump({str(k): v for k, v in res.items()}, open(f"{out}/eval.json", "w"))
torch.distributed.destroy_process_group()
"""


def sharded_and_single(config: str, classes: int, overrides: list[str], tmp_path: Path
                       ) -> tuple[dict, dict]:
    """``evaluate_steps`` at 1 and 3 steps of a seeded random model on the val split: in two
    torchrun processes (rank 0's result) and in this one."""
    from densediff.engine.evaluate import evaluate_steps
    from densediff.tasks import build_dataset, build_model, load_config

    torchrun_two(EVAL_CHILD, {"config": config, "classes": classes, "overrides": overrides},
                 tmp_path)
    sharded = json.loads((tmp_path / "eval.json").read_text())
    cfg = load_config(config, overrides)
    torch.manual_seed(0)
    single = evaluate_steps(build_model(cfg, classes), build_dataset(cfg, "val", train=False), cfg,
                            [1, 3], progress=False)
    return sharded, single


def test_depth_eval_sharded_over_two_processes_equals_one(tmp_path):
    """Rank 1 gets no image (one val scene): the uncertainty metrics must still be reduced
    on both ranks (no hang), and the result must equal a single-process evaluation."""
    overrides = ["data.gen_size=[32,48]", "data.gen_num_val=1", "model.diffusion.randsteps=2",
                 "model.encoder.variant=tiny", "model.neck.channels=16", "model.neck.num_groups=4",
                 "model.head.channels=16", "model.head.num_layers=1", "model.head.num_heads=4",
                 "model.head.ffn_channels=32"]
    sharded, single = sharded_and_single("generated/depth_ddp.yaml", 1, overrides, tmp_path)
    for n in (1, 3):
        a, b = sharded[str(n)], single[n]
        assert set(a["uncertainty"]) == {"steps", "starts"} == set(b["uncertainty"])
        for k in ("d1", "abs_rel", "rmse", "silog"):
            assert abs(a[k] - b[k]) < 1e-6, (n, k)
        assert abs(a["uncertainty"]["starts"]["pearson"]
                   - b["uncertainty"]["starts"]["pearson"]) < 1e-6


def test_bev_eval_sharded_over_two_processes_equals_one(tmp_path):
    """Three val scenes over two ranks: the IoU counts and uncertainty histograms are summed
    over processes, so the result equals a single-process evaluation."""
    BEV_TINY = tiny.TINY["generated/bev_ddp.yaml"]

    overrides = [o for o in BEV_TINY if not o.startswith("train.")] + ["data.gen_num_val=3"]
    sharded, single = sharded_and_single("generated/bev_ddp.yaml", 6, overrides, tmp_path)
    for n in (1, 3):
        a, b = sharded[str(n)], single[n]
        assert a["table"] == b["table"] and a["mIoU"] == b["mIoU"]
        assert abs(a["uncertainty"]["steps"]["AUROC"] - b["uncertainty"]["steps"]["AUROC"]) < 1e-9
