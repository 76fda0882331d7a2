"""Mean +- std over seeds of the issue #13 runs (benchmarks/ddp_levers_generated.sh).

For each recipe folder ``<runs>/<recipe>_seed<S>``: val (``diag_val.json``: the step curve,
the best single-call control, map reliance at t = 0.5, fuse weights) and, when present, test
(``eval_test.json``: the step curve with the controls' gains). The twin has ``eval_*.json``.

Usage: python benchmarks/summarize_levers.py benchmarks/runs/levers [recipe ...]
"""

from __future__ import annotations

import json
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
            if "steps" in e:
                for n, m_ in e["steps"].items():
                    r[f"test_{n}"].append(m_["mIoU"])
                r["test_best_control"].append(e["gains"]["best_control"]["metric"])
            else:
                r["test_twin"].append(e["mIoU"])
    return out


def main(argv: list[str]) -> None:
    root, recipes = Path(argv[0]), argv[1:] or None
    data = collect(root, recipes)
    for split in ("val", "test"):
        print(f"\n{split} mIoU (mean ± std over seeds)")
        head = f"| recipe | seeds | twin | {' | '.join(STEPS)} steps | best single call |"
        print(head + "\n|" + "---|" * (head.count("|") - 1))
        for name, r in data.items():
            cells = [ms(r[f"{split}_{n}"]) for n in STEPS]
            print(f"| {name} | {','.join(map(str, sorted(r['seeds'])))} | "
                  f"{ms(r[f'{split}_twin'])} | {' | '.join(cells)} | "
                  f"{ms(r[f'{split}_best_control'])} |")
    print("\nmap reliance at t = 0.5 (val): mIoU own GT − other GT; relative output change")
    for name, r in data.items():
        if r["reliance_05"]:
            print(f"| {name} | {ms(r['reliance_05'])} | {ms(r['change_05'])} |")


if __name__ == "__main__":
    main(sys.argv[1:])
