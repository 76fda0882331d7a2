"""Print Markdown tables from `densediff eval --out` JSON files (one row per run and step count;
segmentation, depth or BEV results, by the first file).

    python benchmarks/summarize_steps.py NAME=path/to/eval.json [NAME=path ...]
"""

from __future__ import annotations

import json
import sys


def _results(path: str) -> dict:
    """``{steps: metrics}`` of an eval JSON (one ``–`` entry for a single setting)."""
    data = json.load(open(path))
    return data["steps"] if "steps" in data else {"–": data}


def rows(name: str, path: str) -> list[str]:
    out = []
    for steps, m in _results(path).items():
        u = m.get("uncertainty", {})
        cells = [name, steps, f"{m['aAcc']:.2f}", f"{m['mIoU']:.2f}", f"{m['mBIoU']:.2f}"]
        for kind in ("steps", "entropy"):
            cells += ([f"{u[kind]['AUROC']:.1f}", f"{u[kind]['err_top10']:.1f}"] if kind in u
                      else ["–", "–"])
        cells.append(f"{u['entropy']['err_all']:.1f}" if "entropy" in u else "–")
        out.append("| " + " | ".join(cells) + " |")
    return out


DEPTH_KEYS = ("d1", "d2", "d3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog")


def depth_rows(name: str, path: str) -> list[str]:
    out = []
    for steps, m in _results(path).items():
        u = m.get("uncertainty", {})
        cells = [name, steps] + [f"{m[k]:.3f}" for k in DEPTH_KEYS]
        for kind in ("steps", "starts"):
            cells += ([f"{u[kind]['pearson']:.3f}", f"{u[kind]['ause_abs_rel']:.4f}"]
                      if kind in u else ["–", "–"])
        out.append("| " + " | ".join(cells) + " |")
    return out


def bev_rows(name: str, path: str) -> list[str]:
    out = []
    for steps, m in _results(path).items():
        u = m.get("uncertainty", {})
        cells = [name, steps] + [f"{v:.2f}" for v in m["per_class"].values()]
        cells += [f"{m['mIoU']:.2f}", f"{m['mIoU@0.50']:.2f}"]
        cells += [f"{u[k]['AUROC']:.1f}" if k in u else "–" for k in ("steps", "entropy")]
        out.append("| " + " | ".join(cells) + " |")
    return out


def kind(path: str) -> str:
    first = next(iter(_results(path).values()))
    return "depth" if "abs_rel" in first else "bev" if "mIoU@0.50" in first else "seg"


if __name__ == "__main__":
    pairs = [arg.split("=", 1) for arg in sys.argv[1:]]
    if pairs and kind(pairs[0][1]) == "bev":
        names = list(next(iter(_results(pairs[0][1]).values()))["per_class"])
        print("| model | steps | " + " | ".join(names) + " | mIoU | mIoU@0.5 | AUROC step-change "
              "| AUROC entropy |")
        print("|---|---:|" + "---:|" * (len(names) + 4))
        for name, path in pairs:
            print("\n".join(bev_rows(name, path)))
    elif pairs and kind(pairs[0][1]) == "depth":
        print("| model | steps | " + " | ".join(DEPTH_KEYS) + " | Pearson step-spread "
              "| AUSE step-spread | Pearson start-spread | AUSE start-spread |")
        print("|---|---:|" + "---:|" * (len(DEPTH_KEYS) + 4))
        for name, path in pairs:
            print("\n".join(depth_rows(name, path)))
    else:
        print("| model | steps | aAcc | mIoU | mBIoU | AUROC step-change | err@10% step-change "
              "| AUROC entropy | err@10% entropy | err all |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, path in pairs:
            print("\n".join(rows(name, path)))
