"""Mean +- std over seeds of the issue #13 runs (benchmarks/ddp_levers_generated.sh).

For each recipe folder ``<runs>/<recipe>_seed<S>``: val (``diag_val.json``: the step curve,
the best single-call control, map reliance at t = 0.5, fuse weights) and, when present, test
(``eval_test.json``: the step curve and the controls; controls run apart from it may sit in
``eval_test_controls.json``: the best single call is taken over both). The twin has
``eval_*.json``.
Where a run folder has the trainer's ``metrics.csv``, "val (trainer)" is its best full-val
mIoU at the model's default steps (the selection number). ``--full`` adds, for test, mBIoU
and the uncertainty AUROCs (step-change, entropy; the twin: its softmax entropy).

Works for every task (BEV: mIoU without mBIoU; depth: AbsRel, lower is better).

Usage: python benchmarks/summarize_levers.py [--full] benchmarks/runs/levers [recipe ...]
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

STEPS = ("1", "2", "3", "5", "10")


def ms(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def collect(root: Path, recipes: list[str] | None) -> dict:
    out: dict = defaultdict(lambda: defaultdict(list))
    for d in sorted(root.iterdir()):
        m = re.fullmatch(r"(.+)_seed(\d+)", d.name)
        if not m or (recipes and m.group(1) not in recipes):
            continue
        r = out[m.group(1)]
        r["seeds"].append(int(m.group(2)))
        if (d / "metrics.csv").is_file():
            with open(d / "metrics.csv") as f:
                vals = [float(row["mIoU"]) for row in csv.DictReader(f) if row.get("mIoU")]
            if vals:
                r["val_trainer"].append(max(vals))
        if (d / "diag_val.json").is_file():
            diag = json.loads((d / "diag_val.json").read_text())
            for s in diag["sampler"]:
                r[f"val_{s['steps']}"].append(s["metric"])
            r["val_best_control"].append(diag["gains"]["best_control"]["metric"])
            rel = {x["t"]: x for x in diag["reliance"]}[0.5]
            r["reliance_05"].append(rel["metric_own"] - rel["metric_other"])
            r["change_05"].append(rel["rel_change"])
        elif (d / "eval_val.json").is_file():
            r["val_twin"].append(json.loads((d / "eval_val.json").read_text())["mIoU"])
        if (d / "eval_test.json").is_file():
            e = json.loads((d / "eval_test.json").read_text())
            per_step = e["steps"] if "steps" in e else {"twin": e}
            for n, m_ in per_step.items():
                if n not in r["test_names"]:
                    r["test_names"].append(n)
                key = "mIoU" if "mIoU" in m_ else "abs_rel"  # depth: AbsRel
                r[f"test_{n}"].append(m_[key])
                r[f"test_{n}_mBIoU"].append(m_.get("mBIoU", math.nan))  # BEV, depth: none
                for k, u in m_.get("uncertainty", {}).items():
                    r[f"test_{n}_auroc_{k}"].append(u["AUROC"])
            controls = list(e.get("controls", []))
            extra = d / "eval_test_controls.json"  # controls run apart from the step curve
            if extra.is_file():
                controls += json.loads(extra.read_text()).get("controls", [])
            if controls:  # the best single call on test (AbsRel: lower is better)
                best = min if key == "abs_rel" else max
                r["test_best_control"].append(best(c["metric"] for c in controls))
    return out


def main(argv: list[str]) -> None:
    full = "--full" in argv
    argv = [a for a in argv if a != "--full"]
    root, recipes = Path(argv[0]), argv[1:] or None
    data = collect(root, recipes)
    if any(r["val_trainer"] for r in data.values()):
        print("\nval (trainer, selection): best full-val mIoU at the default steps")
        for name, r in data.items():
            print(f"| {name} | {ms(r['val_trainer'])} |")
    for split in ("val", "test"):
        print(f"\n{split} mIoU (mean ± std over seeds)")
        head = f"| recipe | seeds | twin | {' | '.join(STEPS)} steps | best single call |"
        print(head + "\n|" + "---|" * (head.count("|") - 1))
        for name, r in data.items():
            cells = [ms(r[f"{split}_{n}"]) for n in STEPS]
            print(f"| {name} | {','.join(map(str, sorted(r['seeds'])))} | "
                  f"{ms(r[f'{split}_twin'])} | {' | '.join(cells)} | "
                  f"{ms(r[f'{split}_best_control'])} |")
    if full:
        print("\ntest: mIoU | mBIoU | AUROC step-change | AUROC entropy (mean ± std)")
        for name, r in data.items():
            for n in r["test_names"]:
                cells = [ms(r[f"test_{n}"]),
                         ms([v for v in r[f"test_{n}_mBIoU"] if not math.isnan(v)]),
                         ms([v for v in r[f"test_{n}_auroc_steps"] if not math.isnan(v)]),
                         ms(r[f"test_{n}_auroc_entropy"])]
                print(f"| {name} | {n} | {' | '.join(cells)} |")
    print("\nmap reliance at t = 0.5 (val): mIoU own GT − other GT; relative output change")
    for name, r in data.items():
        if r["reliance_05"]:
            print(f"| {name} | {ms(r['reliance_05'])} | {ms(r['change_05'])} |")


if __name__ == "__main__":
    main(sys.argv[1:])
