"""Accuracy of ``densediff export --quantize int8`` on trained checkpoints (issue #26, part 2):
each checkpoint evaluated on one split with PyTorch (fp32, the default path), with its fp32
ONNX export on onnxruntime and with its int8 export (dynamic int8 linear layers). Same seeded
noise in every setting (eval seeds), so differences are the arithmetic's only. Prints each
setting's metric per step count and its change against PyTorch fp32; with ``--time`` also the
median seconds of one whole prediction per setting (interleaved rounds, batch 1, the split's
first image).

With ``--static N`` also a static (calibrated) int8 setting: the fp32 export's MatMul/Gemm
layers quantised with onnxruntime's ``quantize_static`` (QDQ, int8 weights per channel, uint8
activations with ranges calibrated (MinMax) on the graphs' inputs of N training images sampled
with the fp32 export at the largest ``--steps``); the library's ``export --quantize int8`` is
the dynamic one.

Usage: python benchmarks/int8_accuracy.py CKPT [CKPT ...] [--split val] [--steps 1,3]
       [--data-root DIR] [--size H W] [--time ROUNDS] [--static N] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from densediff.api import load_model
from densediff.deploy import export_model, load_onnx_model
from densediff.engine.evaluate import evaluate_steps
from densediff.tasks import build_dataset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--split", default="val")
    ap.add_argument("--steps", default="1,3")
    ap.add_argument("--data-root")
    ap.add_argument("--size", type=int, nargs=2)
    ap.add_argument("--time", type=int, default=0)
    ap.add_argument("--static", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    report = {}
    for ckpt in args.checkpoints:
        overrides = [f"data.root={args.data_root}"] if args.data_root else []
        model, cfg, _, _ = load_model(ckpt, overrides)
        model.eval()
        key = "mIoU"  # segmentation checkpoints
        dataset = build_dataset(cfg, getattr(cfg.data, f"{args.split}_split", args.split),
                                train=False)
        with tempfile.TemporaryDirectory() as tmp:
            models = {"torch fp32": model}
            checks = {}
            for q in (None, "int8"):
                out = Path(tmp) / (q or "fp32")
                meta = export_model(model, cfg, out, size=tuple(args.size) if args.size else None,
                                    quantize=q)
                checks[q or "fp32"] = meta["check"]
                models[f"onnx {q or 'fp32'}"] = _evaluable(load_onnx_model(out))
            if args.static:
                train = build_dataset(cfg, cfg.data.train_split, train=False)
                models["onnx int8-static"] = _evaluable(_static_int8(
                    Path(tmp) / "fp32", Path(tmp) / "static", train, args.static, max(steps)))
            rows = {}
            for name, m in models.items():
                start = time.perf_counter()
                res = evaluate_steps(m, dataset, cfg, steps, progress=False, precision="fp32")
                rows[name] = {"seconds": time.perf_counter() - start,
                              **{str(n): res[n][key] for n in steps}}
                print(f"{ckpt} {args.split} {name:11} " + "  ".join(
                    f"{n} steps {key} {res[n][key]:.3f}" for n in steps)
                    + f"  ({rows[name]['seconds']:.0f} s)", flush=True)
            if args.time:
                _time(models, dataset, cfg, max(steps), args.time, rows)
        ref = rows["torch fp32"]
        for name in rows:
            rows[name]["change"] = {str(n): rows[name][str(n)] - ref[str(n)] for n in steps}
        report[str(ckpt)] = {"metric": key, "split": args.split, "settings": rows,
                             "export_check": checks, "images": len(dataset),
                             "threads": torch.get_num_threads()}
        print(json.dumps({k: v["change"] for k, v in rows.items()}))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))


def _evaluable(onnx_model):
    """An onnxruntime model with what ``evaluate_steps`` asks of a module: the device off its
    first parameter, ``training`` and ``train()``."""
    onnx_model.parameters = lambda: iter([torch.zeros(0)])
    onnx_model.training = False
    onnx_model.train = lambda mode=True: onnx_model
    return onnx_model


@torch.no_grad()
def _static_int8(fp32: Path, out: Path, dataset, n: int, steps: int):
    """The export in ``fp32`` with its graphs quantised statically (see the module doc),
    written to ``out``; returns it loaded."""
    import shutil

    from onnxruntime import quantization as q

    calib = load_onnx_model(fp32)
    feeds: dict[str, list[dict]] = {g: [] for g in calib.sessions}
    for g, sess in calib.sessions.items():
        run = sess.sess.run
        sess.sess.run = (lambda out_names, f, g=g, run=run:
                         feeds[g].append(dict(f)) or run(out_names, f))
    for i in range(min(n, len(dataset))):
        calib.predict_map(dataset[i]["image"][None], steps=steps, seeds=[i])
    shutil.copytree(fp32, out)

    class Reader(q.CalibrationDataReader):
        def __init__(self, items):
            self.items = iter(items)

        def get_next(self):
            return next(self.items, None)

    for g, name in calib.meta["graphs"].items():
        q.quantize_static(str(fp32 / name), str(out / name), Reader(feeds[g]),
                          quant_format=q.QuantFormat.QDQ, per_channel=True,
                          activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                          op_types_to_quantize=["MatMul", "Gemm"])
    return load_onnx_model(out)


@torch.no_grad()
def _time(models: dict, dataset, cfg, n: int, rounds: int, rows: dict) -> None:
    """Median seconds of one ``n``-step prediction per model, rotating order per round."""
    from densediff.tasks import spec_for

    size = next(m.input_size for m in models.values() if hasattr(m, "input_size"))
    img, _ = spec_for(cfg).pipeline.example_input(cfg, size, 1, torch.device("cpu"))
    names = list(models)
    ts = {k: [] for k in names}
    for r in range(rounds + 1):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            models[k].predict_map(img, steps=n)
            if r:
                ts[k].append(time.perf_counter() - t)
    for k in names:
        rows[k][f"predict{n}_s"] = statistics.median(ts[k])
        print(f"  {k:11} {n}-step prediction {statistics.median(ts[k]) * 1e3:.1f} ms "
              f"(x{statistics.median(a / b for a, b in zip(ts['torch fp32'], ts[k])):.2f} "
              "vs torch fp32)")


if __name__ == "__main__":
    main()
