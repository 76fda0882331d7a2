"""Print Markdown tables from `densediff eval --out` JSON files (one row per run and step count).

    python benchmarks/summarize_steps.py NAME=path/to/eval.json [NAME=path ...]
"""

from __future__ import annotations

import json
import sys


def rows(name: str, path: str) -> list[str]:
    data = json.load(open(path))
    out = []
    results = data["steps"] if "steps" in data else {"–": data}
    for steps, m in results.items():
        u = m.get("uncertainty", {})
        cells = [name, steps, f"{m['aAcc']:.2f}", f"{m['mIoU']:.2f}", f"{m['mBIoU']:.2f}"]
        for kind in ("steps", "entropy"):
            cells += ([f"{u[kind]['AUROC']:.1f}", f"{u[kind]['err_top10']:.1f}"] if kind in u
                      else ["–", "–"])
        cells.append(f"{u['entropy']['err_all']:.1f}" if "entropy" in u else "–")
        out.append("| " + " | ".join(cells) + " |")
    return out


if __name__ == "__main__":
    print("| model | steps | aAcc | mIoU | mBIoU | AUROC step-change | err@10% step-change "
          "| AUROC entropy | err@10% entropy | err all |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for arg in sys.argv[1:]:
        name, path = arg.split("=", 1)
        print("\n".join(rows(name, path)))
