"""Official parity, end to end, against the official DDP code run as an oracle (issue #22).

The official code builds a random model (norms, offsets, biases, layer scales perturbed from
their initial values), saves it with mmcv's own ``save_checkpoint`` and dumps every stage
(``benchmarks/official_oracle.py``, in the oracle's venv); ``densediff convert`` converts the
file and ``benchmarks/official_parity.py`` compares: backbone maps, neck, one decoder call, the
seeded sampler at the config's default steps and the full-resolution labels, at a size that is
not a multiple of 32 (Swin pads inside its ops, ConvNeXt floors).

Skipped unless ``DENSEDIFF_ORACLE`` names a folder with the oracle's ``venv/`` and the official
repository in ``DDP/`` (``../shared/tools/official-oracle/README.md`` builds both). About
30 s when it runs on an idle 2-core CPU. The full table: ``benchmarks/official_parity.sh``.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ORACLE = Path(os.environ["DENSEDIFF_ORACLE"]) if os.environ.get("DENSEDIFF_ORACLE") else None
OPY = ORACLE / "venv" / "bin" / "python" if ORACLE else None

if ORACLE is None:
    pytest.skip("official oracle not configured (set DENSEDIFF_ORACLE to a folder with venv/ "
                "and DDP/; see ../shared/tools/official-oracle/README.md)",
                allow_module_level=True)
if not (OPY.exists() and (ORACLE / "DDP" / "segmentation").is_dir()):
    pytest.skip(f"DENSEDIFF_ORACLE={ORACLE}: no venv/bin/python or DDP/segmentation there",
                allow_module_level=True)

TOL = 1e-4
SIZE = "72x100"  # neither side a multiple of 32
CASES = ["ddp_swin_t_2x8_512x512_160k_ade20k", "ddp_convnext_t_4x4_512x1024_160k_cityscapes"]


def _parity_module():
    spec = importlib.util.spec_from_file_location(
        "official_parity", REPO / "benchmarks" / "official_parity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", CASES)
def test_converted_checkpoint_equals_the_official_model(name, tmp_path):
    dumps, out = tmp_path / "oracle", tmp_path / "converted"
    env = {**os.environ, "DENSEDIFF_ORACLE": str(ORACLE), "PYTHONPATH": ""}
    res = subprocess.run([str(OPY), str(REPO / "benchmarks" / "official_oracle.py"), name,
                          "--out", str(dumps), "--sizes", SIZE, "--seed", "3"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]

    res = subprocess.run([sys.executable, "-m", "densediff.cli.main", "convert",
                          str(dumps / f"{name}.pth"), str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]

    import torch

    parity = _parity_module()
    model = parity.load(out).model.eval()  # densediff.load (the run folder, or its weights)
    d = torch.load(dumps / f"{name}_{SIZE}.pt", weights_only=False)
    r = parity.compare_stages(model, d)
    assert r["default_steps_match"] and r["accumulation_match"], r
    diffs = {k: parity.worst(r[k]) for k in ("backbone", "neck", "time_emb", "decoder", "noise",
                                             "step_logits", "sample", "full_res") if k in r}
    bad = {k: v for k, v in diffs.items() if math.isnan(v) or v > TOL}
    assert not bad, f"max |diff| above {TOL}: {bad} (all: {diffs})"
    assert r["labels"] == 100.0, r
