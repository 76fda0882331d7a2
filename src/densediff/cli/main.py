"""``densediff`` command line: train, eval, predict, app, export, bench, info, data check, demo.

User mistakes (bad files, keys, checkpoints) end with one ``error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from densediff.errors import UserError, terminal_line
from densediff.limits import DATA_CHECK_FORMATS, MAX_SEED
from densediff.utils.alloc import configure_allocator

# ------------------------------------------------------------------------------------------
# commands


def cmd_train(args: argparse.Namespace) -> int:
    from densediff.engine.trainer import train
    from densediff.tasks import load_config

    cfg = load_config(args.config, args.overrides)
    metrics = train(cfg, resume=args.resume)
    if metrics and os.environ.get("RANK", "0").strip() in ("", "0"):
        print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list)}, indent=1))
    return 0


def parse_steps(text: str | None, low: int = 0) -> list[int] | None:
    """``"1,2,3"`` -> [1, 2, 3]; UserError naming the option when malformed or below ``low``
    (the model's step bounds are checked by the library: ``pipelines.check_steps``)."""
    if text is None:
        return None
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--steps: expected comma-separated integers like 1,2,3, got {text!r}"
                        ) from None
    if not steps or min(steps) < low:
        raise UserError(f"--steps: step counts must be at least {low}, got {text!r}")
    return steps




def parse_controls(text: str) -> list[tuple[str, float]] | None:
    """``--controls``: ``all`` -> None (every input and time label), else a comma list of
    ``INPUT@T`` (INPUT noise or zero, 0 <= T <= 1), e.g. ``zero@0.95,noise@1``."""
    if text.strip() == "all":
        return None
    pairs = []
    for item in text.split(","):
        kind, _, t = item.strip().partition("@")
        try:
            value = float(t)
        except ValueError:
            value = float("nan")
        if kind not in ("noise", "zero") or not 0.0 <= value <= 1.0:
            raise UserError(f"--controls: expected 'all' or INPUT@T items (INPUT noise or zero, "
                            f"0 <= T <= 1), e.g. zero@0.95,noise@1; got {item.strip()!r}")
        pairs.append((kind, value))
    return pairs


def check_range(value: int | None, option: str, low: int, high: int) -> None:
    """UserError naming ``option`` unless ``low <= value <= high`` (None passes)."""
    if value is not None and not low <= value <= high:
        raise UserError(f"{option}: must be between {low} and {high}, got {value}")




def _add_ddps_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--guidance", type=float, help="DDPS: classifier-free guidance scale s "
                   "(0 = off; default: model.ddps.guidance)")
    p.add_argument("--renoise", choices=["free", "posterior"],
                   help="DDPS: re-noising between steps (default: model.ddps.renoise)")


def _ddps_overrides(args: argparse.Namespace) -> list[str]:
    """``--guidance`` / ``--renoise`` as overrides of the stored config."""
    out = []
    if args.guidance is not None:
        from densediff.utils.checks import finite_float

        finite_float(args.guidance, "--guidance", low=0.0, high=1000.0)
        out.append(f"model.ddps.guidance={args.guidance}")
    if args.renoise is not None:
        out.append(f"model.ddps.renoise={args.renoise}")
    return out


def _check_ddps_options(args: argparse.Namespace, cfg) -> None:
    for opt in ("guidance", "renoise"):
        if getattr(args, opt) is not None and cfg.model.type != "ddps":
            raise UserError(f"--{opt}: {args.checkpoint} is not a DDPS model")


def _check_eval_outputs(args: argparse.Namespace) -> None:
    """``--out`` / ``--plot``: file paths that can be written (before any work: a result that
    cannot be written is lost)."""
    from densediff.utils.fs import check_writable_file

    for opt, kind in (("out", "JSON"), ("plot", "PNG")):
        path = getattr(args, opt)
        if path and Path(path).is_dir():
            raise UserError(f"{path}: --{opt} must be a {kind} file path, but this is a folder")
        if path:
            check_writable_file(path, f"--{opt}")


def cmd_eval(args: argparse.Namespace) -> int:
    from densediff.api import load_model, resolve_device, resolve_precision_or_fail
    from densediff.engine.evaluate import evaluate_steps
    from densediff.pipelines import is_diffusion, resolve_steps
    from densediff.tasks import build_dataset, spec_for
    from densediff.viz import plot_steps

    _check_eval_outputs(args)
    steps = parse_steps(args.steps)
    if args.controls is not None and args.no_controls:
        raise UserError("--controls: contradicts --no-controls; give one of them")
    controls = parse_controls(args.controls if args.controls is not None else "all")
    device = resolve_device(args.device, "--device")
    overrides = list(args.overrides)
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    overrides += _ddps_overrides(args)
    precision = resolve_precision_or_fail(args.precision, device, "--precision")
    model, cfg, names, _ = load_model(args.checkpoint, overrides)
    _check_ddps_options(args, cfg)
    spec = spec_for(cfg)
    pipe = spec.pipeline
    pipe.check_aug(args.aug_test, str(args.checkpoint))
    from densediff.engine.diagnose import is_ddp

    for opt, given in (("--controls", args.controls is not None),
                       ("--no-controls", args.no_controls)):
        if given and not is_ddp(model):
            raise UserError(f"{opt}: applies to DDP models (the single-call controls of the map "
                            f"decoder); {args.checkpoint} is a {cfg.model.type} model")
    if args.plot and not is_diffusion(model):
        raise UserError(f"--plot: applies to diffusion models (the metric against the step "
                        f"count); {args.checkpoint} is not one")
    if steps is not None:  # before any work: the model takes these step counts
        steps = resolve_steps(model, steps, str(args.checkpoint), "--steps")
    model.to(device)
    split = getattr(cfg.data, f"{args.split}_split", args.split)
    dataset = build_dataset(cfg, split, train=False)
    results = evaluate_steps(model, dataset, cfg, steps, aug=args.aug_test,
                             progress=not args.quiet, precision=precision)
    print(f"{args.checkpoint} on {cfg.data.dataset}/{split} ({len(dataset)} images)"
          f"{f' with {pipe.aug_name}' if args.aug_test else ''}, {precision}")

    def fmt(m: dict) -> str:
        return pipe.format_metrics(m, names)
    if not is_diffusion(model):
        metrics = results[0]
        print(fmt(metrics))
    else:
        metrics = {"steps": {str(n): m for n, m in results.items()}}
        if len(results) == 1:
            print(f"steps: {next(iter(results))}")
            print(fmt(next(iter(results.values()))))
        print(pipe.steps_table(results))
        if not args.no_controls and is_ddp(model):
            from densediff.utils.precision import autocast

            with autocast(precision, device):
                metrics.update(_control_gains(model, dataset, cfg, results, controls,
                                              args.quiet))
        plot = args.plot or (str(Path(args.out).with_suffix("")) + "_steps.png"
                             if args.out and len(results) > 1 else None)
        if plot:
            from densediff.utils.fs import atomic_write

            keys = pipe.plot_keys or (spec.headline,)
            atomic_write(Path(plot), lambda tmp: plot_steps(
                results, tmp, keys, pipe.plot_ylabel,
                title=f"{Path(args.checkpoint).name} {split}"), what="--plot")
            print(f"wrote {plot}")
    if args.out:
        _write_json(Path(args.out), metrics)
        print(f"wrote {args.out}")
    return 0


def _control_gains(model, dataset, cfg, results: dict, pairs: list | None, quiet: bool) -> dict:
    """DDP: one decoder call on pure noise / a zero map at several time labels (the controls
    that could show a step curve to be a time-label effect; ``pairs``: only these (input, t),
    e.g. the best one chosen on val); prints each step count's gain over the best control and
    over 1 step."""
    from densediff.engine.diagnose import gains_over_controls, single_call_controls, task_metric

    controls = single_call_controls(model, dataset, cfg, pairs=pairs, progress=not quiet)
    key, lower = task_metric(cfg)
    gains = gains_over_controls({n: m[key] for n, m in results.items()}, controls, lower)
    best = gains["best_control"]
    print(f"best single decoder call (control): {best['input']} map at t = {best['t']:.3f}: "
          f"{key} {best['metric']:.4g}; gain of each step count (positive = better):")
    for n in results:
        vs1 = gains["over_step_1"].get(n)
        print(f"  steps {n}: {gains['over_best_control'][n]:+.4g} vs best control"
              + (f", {vs1:+.4g} vs 1 step" if vs1 is not None else ""))
    return {"controls": controls, "gains": gains}


def cmd_diagnose(args: argparse.Namespace) -> int:
    from densediff.api import load
    from densediff.engine.diagnose import format_diagnosis, is_ddp
    from densediff.utils.fs import check_writable_file

    if args.out:
        check_writable_file(args.out, "--out")
    check_range(args.limit, "--limit", 2, 10**9)
    steps = parse_steps(args.steps, low=1)
    from densediff.api import resolve_device

    resolve_device(args.device, "--device")
    predictor = load(args.checkpoint, device=args.device, overrides=list(args.overrides))
    if not is_ddp(predictor.model):
        raise UserError(f"{args.checkpoint}: not a DDP model; diagnostics read the map decoder "
                        "of a DDP checkpoint (segmentation, depth or BEV)")
    result = predictor.diagnose(args.split, limit=args.limit, steps=steps,
                                data_root=args.data_root, progress=not args.quiet)
    print(f"{args.checkpoint} on {predictor.cfg.data.dataset}/{args.split}")
    print(format_diagnosis(result))
    if args.out:
        _write_json(Path(args.out), result)
        print(f"wrote {args.out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """``predict``: every input (image files; BEV: samples of a dataset split) through the
    checkpoint's task pipeline; each result writes its own files (``Prediction.save``)."""
    from densediff.api import load
    from densediff.utils.fs import check_writable_dir

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        from densediff.utils.checks import path_kind

        raise UserError(f"{out}: --out must be a folder, but this is {path_kind(out)}")
    if args.steps is not None and args.steps < 0:
        raise UserError(f"--steps: must be at least 0, got {args.steps}")
    check_range(args.seed, "--seed", 0, MAX_SEED)
    check_range(args.limit, "--limit", 1, 10**9)
    check_range(args.batch_size, "--batch-size", 1, 4096)
    if args.fps is not None and not (args.fps > 0 and args.fps <= 1000):
        raise UserError(f"--fps: must be above 0 and at most 1000, got {args.fps}")
    if args.fps is not None and not args.video:
        raise UserError("--fps: applies with --video (the frame rate of a video made of a "
                        "folder of frames; video files keep their own)")
    check_writable_dir(out, "--out")  # before any work: results that cannot be written are lost
    if args.runtime == "onnx":  # the first argument is a `densediff export` folder
        from densediff.deploy import load_onnx

        for opt, value, default in (("device", args.device, "cpu"),
                                    ("precision", getattr(args, "precision", "fp32"), "fp32")):
            if value != default:
                raise UserError(f"--{opt} {value}: --runtime onnx runs the exported fp32 "
                                "graphs on the CPU")
        if args.compile:
            raise UserError("--compile: applies to --runtime torch (onnxruntime optimises "
                            "its graphs itself)")
        predictor = load_onnx(args.checkpoint)
    else:
        from densediff.api import resolve_device, resolve_precision_or_fail

        resolve_precision_or_fail(args.precision, resolve_device(args.device, "--device"),
                                  "--precision")
        predictor = load(args.checkpoint, device=args.device, overrides=_ddps_overrides(args),
                         precision=args.precision)
        if args.compile:

            from densediff.models import DDP

            if not isinstance(predictor.model, DDP):
                raise UserError(f"--compile: {args.checkpoint} has no map decoder to compile "
                                "(it applies to DDP models)")
            predictor.compile()
    _check_ddps_options(args, predictor.cfg)
    pipe = predictor.pipeline
    if not predictor.is_diffusion:
        for opt in ("steps", "trajectory", "seed"):
            if getattr(args, opt) is not None and getattr(args, opt) is not False:
                raise UserError(f"--{opt}: {args.checkpoint} is not a diffusion model")
    pipe.check_predict_options(str(args.checkpoint), predictor, save_probs=args.save_probs,
                               uncertainty=args.uncertainty, aug=args.aug_test,
                               onnx=args.runtime == "onnx")
    if pipe.image_input:
        for opt in ("limit", "data_root"):
            if getattr(args, opt) is not None:
                raise UserError(f"--{opt.replace('_', '-')}: applies to BEV models (samples of "
                                f"a dataset split); {args.checkpoint} predicts image files")
    if args.steps is not None:
        from densediff.pipelines import check_steps

        check_steps(predictor.model, [args.steps], str(args.checkpoint), "--steps")
    suffixes = pipe.output_names(predictor, args.uncertainty, args.trajectory, args.save_probs)
    options = {"uncertainty": args.uncertainty, "trajectory": args.trajectory,
               "save_probs": args.save_probs}
    if not pipe.image_input:
        return _predict_samples(args, predictor, out, options)
    from densediff.cli.predict import predict_images

    return predict_images(args, predictor, out, options, suffixes)


def _output_stems(files: list[Path]) -> list[str]:
    """Output name stems of the files of one folder (:func:`densediff.cli.predict.output_stems`)."""
    from densediff.cli.predict import output_stems

    return output_stems(files)


def _predict_samples(args: argparse.Namespace, predictor, out: Path, options: dict) -> int:
    """``predict`` for models whose input is a sample of their dataset (BEV: calibrated
    cameras): ``input`` names a split of the checkpoint's dataset."""
    for opt in ("recursive", "video"):
        if getattr(args, opt):
            raise UserError(f"--{opt}: applies to image inputs; {args.checkpoint} is a "
                            f"{predictor.pipeline.name} model, whose input is a dataset split")
    if len(args.input) != 1:
        raise UserError(f"{' '.join(args.input)}: {args.checkpoint} is a "
                        f"{predictor.pipeline.name} model; give one dataset split (e.g. val)")
    args.input = args.input[0]
    given = Path(args.input)
    if given.suffix or given.exists():
        raise UserError(f"{args.input}: {args.checkpoint} is a {predictor.pipeline.name} model: it "
                        "predicts from six calibrated cameras, so its input is a split of its "
                        "dataset (e.g. val or test, with --data-root for another copy), not an "
                        "image file or folder")
    dataset = predictor.dataset(args.input, args.data_root)
    n = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    out.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for start in range(0, n, args.batch_size):
        samples = [dataset[i] for i in range(start, min(n, start + args.batch_size))]
        preds = predictor.predict(samples, steps=args.steps, seed=args.seed or 0)
        for i, (sample, pred) in enumerate(zip(samples, preds), start):
            name = "".join(c if c.isalnum() or c in "-." else "_" for c in sample["meta"]["name"])
            if name in used:  # two names alike once made safe: "~" is never in a safe name
                name = f"{name}~{i}"
            used.add(name)
            written = pred.save(out, name, **options)
            print(f"{sample['meta']['name']} -> {out / (name + '_{' + ','.join(written) + '}')}")
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    """``app``: the local web page of a checkpoint (:mod:`densediff.app`); serves until
    interrupted. Everything that can be checked is checked before the model loads."""
    from densediff.app import build_app, check_host_port, list_examples, require_gradio

    require_gradio()
    check_host_port(args.host, args.port)
    examples = list_examples(args.examples) if args.examples else []
    from densediff.api import load, resolve_device, resolve_precision_or_fail

    resolve_precision_or_fail(args.precision, resolve_device(args.device, "--device"),
                              "--precision")
    predictor = load(args.checkpoint, device=args.device, precision=args.precision)
    if examples and not predictor.pipeline.image_input:
        raise UserError(f"--examples: {args.checkpoint} is a {predictor.pipeline.name} model: "
                        "it predicts from samples of its dataset (picked on the page), not "
                        "image files")
    app = build_app(predictor, source=str(args.checkpoint), examples=examples)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: --host {args.host}: the page (no login) is reachable from other machines "
              "that can reach this address", file=sys.stderr)
    try:
        url = app.launch(args.host, args.port, block=False, quiet=True)
        print(f"densediff app: {args.checkpoint} on {url} (Ctrl-C stops it)", flush=True)
        import time

        while app.blocks.is_running:  # until Ctrl-C / SIGTERM (main: one line, 130 / 143)
            time.sleep(0.2)
    finally:
        app.close()
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``export``: a checkpoint as ONNX graphs + deploy.json (:mod:`densediff.deploy.export`)."""
    from densediff.deploy import export

    meta = export(args.checkpoint, args.out, size=tuple(args.size) if args.size else None,
                  opset=args.opset, overwrite=args.overwrite, quantize=args.quantize)
    h, w = meta["input_size"]
    print(f"{args.checkpoint} -> {args.out}: {', '.join(meta['graphs'].values())}, deploy.json "
          f"({meta['kind']} {meta['task']} model, input {h}x{w}, dynamic batch, opset "
          f"{meta['opset']}{', int8 linear layers' if meta.get('quantize') else ''})")
    if meta["check"]:
        print("onnxruntime vs PyTorch on the tracing inputs, max abs diff: "
              + ", ".join(f"{k.removesuffix('_max_abs_diff')} {v:.2e}"
                          for k, v in meta["check"].items()))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """``convert``: an official DDP checkpoint as a densediff run folder."""
    from densediff.official import convert

    weights = convert(args.source, args.out, config=args.config)
    print(f"{args.source} -> {args.out} (config.yaml, {weights.relative_to(args.out)}); use it "
          f"with eval, predict, diagnose, export, bench or as a DDPS model.ddps.base")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """``models``: the released DDP models (authors' numbers, labelled as theirs)."""
    from densediff.official import RELEASED

    for m in RELEASED:
        print(f"{m.name}\n  config:   {m.config}\n  hub:      {m.hub_uri}\n"
              f"  authors:  {m.reported} (reported by the authors, not measured here)\n"
              f"  densediff: {m.proven}")
    return 0


def _config_arg(arg: str) -> str:
    """A config path, or a run folder (e.g. written by ``convert``): its ``config.yaml``."""
    folder = Path(arg)
    if folder.is_dir():
        if not (folder / "config.yaml").is_file():
            raise UserError(f"{arg}: a folder without config.yaml (give a config file or a run "
                            "folder)")
        return str(folder / "config.yaml")
    return arg


def cmd_bench(args: argparse.Namespace) -> int:
    from densediff.bench import bench, format_bench
    from densediff.tasks import load_config
    from densediff.utils.fs import check_writable_file

    # sizes, counts, variants and --precision are checked by bench() itself, before any work
    steps = parse_steps(args.steps, low=1)  # None: the model's share of 1, 3, 5
    if args.out:
        check_writable_file(args.out, "--out")
    cfg = load_config(_config_arg(args.config), args.overrides)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    batches = None
    if args.batches is not None:
        try:
            batches = [int(b) for b in args.batches.split(",") if b.strip()]
        except ValueError:
            raise UserError(f"--batches: expected comma-separated integers like 1,4,8, got "
                            f"{args.batches!r}") from None
        if not batches:
            raise UserError("--batches: give at least one batch size, e.g. 1,4,8")
    result = bench(cfg, size=tuple(args.size) if args.size else None, batch=args.batch,
                   steps=steps, device=args.device, repeats=args.repeats, variants=variants,
                   batches=batches, precision=args.precision)
    print(format_bench(result))
    if args.out:
        _write_json(Path(args.out), result)
        print(f"wrote {args.out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from densediff.info import describe
    from densediff.tasks import load_config

    cfg = load_config(_config_arg(args.config), args.overrides)
    print(describe(cfg, size=tuple(args.size) if args.size else None))
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from densediff.data.check import check_dataset

    problems = check_dataset(args.root, args.format)
    if problems:
        for p in problems:
            print(p)
        print(f"{len(problems)} problem(s) in {args.root}", file=sys.stderr)
        return 1
    print(f"{args.root}: OK ({args.format})")
    return 0


def cmd_data_convert_masks(args: argparse.Namespace) -> int:
    from densediff.data.convert import convert_masks

    n = convert_masks(args.root, args.out, progress=not args.quiet)
    print(f"{args.root} -> {args.out}: {n} class-id masks (use data.root={args.out})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from densediff.demo import check_demo_options, run_demo

    iters = None
    if args.iters is not None:
        try:
            iters = int(args.iters)
        except ValueError:
            raise UserError(f"--iters: expected a whole number of training iterations, got "
                            f"{args.iters!r}") from None
    check_demo_options(args.out, iters, args.task)  # bad options: one line, before any work
    run_demo(Path(args.out), iters=iters, task=args.task)
    return 0


def _write_json(path: Path, obj) -> None:
    from densediff.utils.fs import atomic_write

    text = json.dumps(obj, indent=1, default=float)
    atomic_write(path, lambda tmp: tmp.write_text(text))  # a failed write: one line


# ------------------------------------------------------------------------------------------
# parser


def _add_train(sub: argparse._SubParsersAction) -> None:
    """The ``train`` subcommand: a config, overrides, ``--resume``."""
    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("config", help="YAML config file (may use _base_ inheritance)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.iters=200")
    t.add_argument("--resume", action="store_true",
                   help="continue from <work_dir>/checkpoints/last exactly")
    t.set_defaults(func=cmd_train)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    """The ``eval`` subcommand: a checkpoint, overrides, step counts, controls, plot."""
    e = sub.add_parser("eval", help="evaluate a checkpoint on a dataset split")
    e.add_argument("checkpoint")
    e.add_argument("overrides", nargs="*", help="dotted overrides of the stored config")
    e.add_argument("--split", default="val", help="val | test | train or a split name")
    e.add_argument("--aug-test", action="store_true",
                   help="multi-scale + flip test (depth: the flip test)")
    e.add_argument("--data-root", help="dataset folder (overrides data.root)")
    e.add_argument("--steps", help="diffusion models: step counts to evaluate in one pass, "
                   "e.g. 1,2,3,5,10 (default: the model's steps; DDPS: 0 = the base "
                   "segmentor)")
    _add_ddps_options(e)
    e.add_argument("--out", help="write the metrics JSON here")
    e.add_argument("--plot", help="diffusion models: write the mIoU- (depth: AbsRel-) vs-steps "
                   "PNG here "
                   "(default with --out and several steps: <out>_steps.png)")
    e.add_argument("--no-controls", action="store_true",
                   help="DDP: skip the single-call controls (one decoder call on noise / a zero "
                   "map at t = 1 .. 1/3) whose best result each step count is compared with")
    e.add_argument("--controls",
                   help="DDP: which controls: all (default: noise and zero map at t = 1, "
                   "0.999, 0.95, 0.5, 1/3), or INPUT@T items, e.g. the best one on val from "
                   "`densediff diagnose`: zero@0.95")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    e.add_argument("--precision", default="fp32", metavar="{fp32,bf16,auto}",
                   help="fp32 (default), or bf16 autocast (sampling locations and the "
                   "diffusion arithmetic stay fp32); auto: bf16 where the hardware has it")
    e.set_defaults(func=cmd_eval)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    """The ``predict`` subcommand: a checkpoint (or export folder), images, ``--out``."""
    pr = sub.add_parser("predict", help="segment (or estimate the depth of) images, folders "
                        "(--recursive), globs or videos; depth writes <name>_depth.png (colour), "
                        "_depth16.png (16-bit, metres x the dataset's PNG scale) and _depth.npy (metres)")
    pr.add_argument("checkpoint", help="checkpoint; with --runtime onnx: a folder written by "
                    "`densediff export`")
    pr.add_argument("input", nargs="+", help="image or video files, folders or globs "
                    "(quoted, e.g. 'shots/**/*.jpg'); BEV checkpoints: a split of the "
                    "checkpoint's dataset (val, test, train or a split name)")
    pr.add_argument("--out", required=True, help="output folder (results mirror the input "
                    "folders below it)")
    pr.add_argument("--recursive", action="store_true",
                    help="also the images and videos in subfolders of a folder input")
    pr.add_argument("--batch-size", type=int, default=1,
                    help="images, video frames or BEV samples per forward pass (default 1); "
                    "whole-image diffusion and BEV inference run the encoder and the sampler "
                    "on the batch, each input with its own noise seed: results bit-identical "
                    "to --batch-size 1")
    pr.add_argument("--video", action="store_true",
                    help="the images of each output folder are the frames of a video: also "
                    "write overlay.mp4 there (video files always write <name>_overlay.mp4)")
    pr.add_argument("--fps", type=float, help="with --video: frames per second (default 10)")
    pr.add_argument("--quiet", action="store_true", help="no progress bar (shown on a "
                    "terminal: images/s and the time left)")
    pr.add_argument("--aug-test", action="store_true",
                    help="multi-scale + flip test (depth: the flip test)")
    pr.add_argument("--save-probs", action="store_true",
                    help="segmentation: also write KxHxW float16 .npy")
    pr.add_argument("--steps", type=int, help="diffusion models: sampling steps "
                    "(default: the model's steps; DDPS: 0 = the base segmentor)")
    pr.add_argument("--seed", type=int, help="diffusion models: noise seed (default 0)")
    pr.add_argument("--limit", type=int, help="BEV: predict the first N samples of the split only")
    pr.add_argument("--data-root", help="BEV: dataset folder (overrides data.root)")
    pr.add_argument("--uncertainty", action="store_true",
                    help="write uncertainty heatmaps (<name>_uncertainty.png: share of steps at "
                    "which the label changed; <name>_entropy.png: normalised entropy; depth: "
                    "the depth's standard deviation over the steps, also as .npy in metres)")
    pr.add_argument("--trajectory", action="store_true",
                    help="diffusion models: write <name>_trajectory.png, the image, every "
                    "step's mask and the uncertainty side by side")
    _add_ddps_options(pr)
    pr.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    pr.add_argument("--compile", action="store_true",
                    help="torch.compile the map decoder first (DDP; pays for many images of "
                    "one size: the first prediction waits for the compiler)")
    pr.add_argument("--precision", default="fp32", metavar="{fp32,bf16,auto}",
                    help="fp32 (default), or bf16 autocast (about 1.6x faster on a CPU with "
                    "native bf16; sampling locations and the diffusion arithmetic stay fp32); "
                    "auto: bf16 where the hardware has it")
    pr.add_argument("--runtime", choices=["torch", "onnx"], default="torch",
                    help="onnx: run the graphs of `densediff export` in onnxruntime (CPU, fp32); "
                    "the first argument is then the export folder")
    pr.set_defaults(func=cmd_predict)


def _add_app(sub: argparse._SubParsersAction) -> None:
    """The ``app`` subcommand: a local web page around a checkpoint."""
    ap = sub.add_parser("app", help="a local web page (Gradio; pip install \"densediff[app]\"): "
                        "upload an image, see the mask with its legend (depth: in metres), the "
                        "uncertainty and every sampling step; download the files")
    ap.add_argument("checkpoint", help="checkpoint: .safetensors, run folder, official .pth or "
                    "hf://<repo>/<file>")
    ap.add_argument("--host", default="127.0.0.1", help="address to serve on (default "
                    "127.0.0.1: this machine only; 0.0.0.0 serves every network)")
    ap.add_argument("--port", type=int, help="port (default: the first free one from 7860)")
    ap.add_argument("--examples", help="folder of example images offered under the upload")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--precision", default="fp32", metavar="{fp32,bf16,auto}",
                    help="fp32 (default), or bf16 autocast; auto: bf16 where the hardware has it")
    ap.set_defaults(func=cmd_app)


def _add_export(sub: argparse._SubParsersAction) -> None:
    """The ``export`` subcommand: a checkpoint as ONNX graphs + deploy.json."""
    ex = sub.add_parser("export", help="export a checkpoint as ONNX graphs + deploy.json for "
                        "`predict --runtime onnx` and densediff.load_onnx (segmentation and "
                        "depth: DDP and discriminative models)")
    ex.add_argument("checkpoint")
    ex.add_argument("--out", required=True, help="export folder (must be new or empty)")
    ex.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="input size of the "
                    "graphs (default: eval.crop_size with sliding windows, else the test size "
                    "of data.test_scale, else the training crop size); images of another size "
                    "are resized to it")
    ex.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    ex.add_argument("--quantize", choices=["int8"], default=None,
                    help="int8: onnxruntime's dynamic int8 quantisation of the linear layers "
                    "(MatMul/Gemm); faster on CPUs with VNNI, outputs change a little "
                    "(benchmarks/RESULTS.md section 14h)")
    ex.add_argument("--overwrite", action="store_true",
                    help="write into a non-empty --out (files of the same name are replaced)")
    ex.set_defaults(func=cmd_export)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    """The ``convert`` subcommand: an official DDP checkpoint as a run folder."""
    cv = sub.add_parser("convert", help="convert an official DDP checkpoint (.pth file or "
                        "hf://yfji/DDP-Weight/<name>.pth) into a densediff run folder")
    cv.add_argument("source", help="official checkpoint: a .pth file or hf://<repo>/<file>")
    cv.add_argument("out", help="run folder to write (must be new or empty)")
    cv.add_argument("--config", help="densediff config of the architecture, for checkpoints "
                    "trained with the official code that are not released models (default: "
                    "recognise the released model)")
    cv.set_defaults(func=cmd_convert)


def _add_models(sub: argparse._SubParsersAction) -> None:
    """The ``models`` subcommand: the released DDP models."""
    mo = sub.add_parser("models", help="list the released DDP models (densediff config, the "
                        "authors' reported numbers, Hub file)")
    mo.set_defaults(func=cmd_models)


def _add_diagnose(sub: argparse._SubParsersAction) -> None:
    """The ``diagnose`` subcommand: map reliance, controls, fuse weights of a DDP."""
    dg = sub.add_parser("diagnose", help="DDP: does the map decoder use its noisy map? map "
                        "reliance, single-call controls vs the step curve, fuse weights")
    dg.add_argument("checkpoint")
    dg.add_argument("overrides", nargs="*", help="dotted overrides of the stored config")
    dg.add_argument("--split", default="val", help="val | test | train or a split name")
    dg.add_argument("--limit", type=int, default=32, help="first N samples of the split "
                    "(default 32, at least 2)")
    dg.add_argument("--steps", default="1,2,3,5,10", help="sampler step counts to score")
    dg.add_argument("--data-root", help="dataset folder (overrides data.root)")
    dg.add_argument("--out", help="write the diagnostics JSON here")
    dg.add_argument("--quiet", action="store_true", help="no progress bar")
    dg.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    dg.set_defaults(func=cmd_diagnose)


def _add_info(sub: argparse._SubParsersAction) -> None:
    """The ``info`` subcommand: parameters, FLOPs and data summary of a config."""
    i = sub.add_parser("info", help="parameters, FLOPs estimate and data summary of a config")
    i.add_argument("config")
    i.add_argument("overrides", nargs="*")
    i.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                   help="input size for the FLOPs estimate (default: crop size)")
    i.set_defaults(func=cmd_info)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    """The ``bench`` subcommand: latencies per execution variant, throughput, memory."""
    b = sub.add_parser("bench", help="latency of the encoder, one decoder step and whole "
                       "predictions at several step counts, and peak memory")
    b.add_argument("config", help="config file, or a run folder (its config.yaml)")
    b.add_argument("overrides", nargs="*")
    b.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="input size "
                   "(default: the training crop size, else 512 512)")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--steps", help="step counts to time (default 1,3,5)")
    b.add_argument("--repeats", type=int, default=10, help="timed rounds (each measurement "
                   "once per variant per round, interleaved)")
    b.add_argument("--variants", default="eager,fast,onnx",
                   help="comma-separated, from eager (fp32, grid_sample attention, default "
                   "malloc), fast (the defaults: gather attention, no-mmap malloc, in "
                   "--precision), compiled (fast + torch.compile of the map decoder), onnx "
                   "(onnxruntime; skipped with a note where it does not apply), onnx-int8 "
                   "(export --quantize int8 on onnxruntime)")
    b.add_argument("--batches", help="batch sizes of the throughput measurement (images/s "
                   "of whole predictions, as `predict --batch-size`), e.g. 1,4,8 (default: "
                   "--batch)")
    b.add_argument("--precision", metavar="{fp32,bf16,auto}",
                   help="precision of the fast and compiled variants (default auto: bf16 "
                   "where the hardware has it)")
    b.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    b.add_argument("--out", help="write the results JSON here")
    b.set_defaults(func=cmd_bench)


def _add_data(sub: argparse._SubParsersAction) -> None:
    """The ``data`` subcommand and its ``check``."""
    d = sub.add_parser("data", help="dataset tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dc = dsub.add_parser("check", help="validate a dataset folder and list every problem")
    dc.add_argument("root")
    dc.add_argument("--format", required=True, choices=DATA_CHECK_FORMATS,
                    help="segmentation: camvid ade20k cityscapes folder; depth: kitti nyu "
                    "sunrgbd depth_folder; BEV: nuscenes")
    dc.set_defaults(func=cmd_data_check)
    dm = dsub.add_parser("convert-masks", help="folder dataset: write colour-coded masks as "
                         "class-id PNGs once (faster loading) into a new dataset folder")
    dm.add_argument("root", help="folder dataset (images/, masks/, classes.txt with colours)")
    dm.add_argument("--out", required=True, help="new dataset folder (new or empty): masks/ "
                    "with class ids, classes.txt and splits/ copied, images/ linked")
    dm.add_argument("--quiet", action="store_true", help="no progress bar")
    dm.set_defaults(func=cmd_data_convert_masks)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    """The ``demo`` subcommand: train + evaluate + predict on generated data."""
    dm = sub.add_parser("demo", help="train + evaluate + predict on built-in generated data")
    dm.add_argument("--out", default="demo_out", help="parent folder of the demo run")
    # --iters and --task are checked by cmd_demo (one-line errors, not argparse's usage text)
    dm.add_argument("--iters", default=None, help="training iterations, 1 to 100000 (default: "
                    "the segmentation config's 1000; depth 1000; BEV 300)")
    dm.add_argument("--task", default="segmentation", metavar="{segmentation,depth,bev,all}",
                    help="which demo to run (default: segmentation, about 4 min on 2 CPU cores; "
                    "all: the three one after the other)")
    dm.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    """The ``densediff`` parser: one subcommand from each ``_add_*`` function above."""
    p = argparse.ArgumentParser(
        prog="densediff", description="Dense prediction by diffusion: train, eval, predict, "
        "app, export, bench, info, data check, demo.")
    sub = p.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_eval(sub)
    _add_predict(sub)
    _add_app(sub)
    _add_export(sub)
    _add_convert(sub)
    _add_models(sub)
    _add_diagnose(sub)
    _add_info(sub)
    _add_bench(sub)
    _add_data(sub)
    _add_demo(sub)
    return p


def error_line(err: UserError) -> str:
    """The one-line message of a user error.

    A DataError raised while a DataLoader worker reads a file comes back re-raised with the
    worker's traceback in its message ("Caught DataError in DataLoader worker process 0.
    Original Traceback ..."); its last line holds the original message.
    """
    text = str(err)
    if "\n" in text and "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        prefix = f"{type(err).__module__}.{type(err).__qualname__}: "
        text = last[len(prefix):] if last.startswith(prefix) else last
    return terminal_line(text)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after options (`train cfg --resume a=b`): collect stray k=v.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if "overrides" in vars(args) and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from densediff.utils.signals import Interrupted, graceful

    try:
        with graceful():  # SIGTERM (kill, timeout, SLURM, docker stop) as Ctrl-C
            configure_allocator()  # glibc: reuse freed tensors instead of page-faulting them in
            return args.func(args)
    except UserError as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        name = str(e) if isinstance(e, Interrupted) else "SIGINT"
        print(f"interrupted ({name}): stopped at a safe point; files written so far are kept",
              file=sys.stderr)
        return e.exit_code if isinstance(e, Interrupted) else 130
    except MemoryError:
        print("error: out of memory; lower the input size (--size), the batch size or the "
              "number of steps", file=sys.stderr)
        return 2
    except RuntimeError as e:  # torch's allocator failures
        text = str(e)
        if "out of memory" not in text and "can't allocate memory" not in text:
            raise
        print(f"error: out of memory ({terminal_line(text)[:160]}); lower the input size, the "
              "batch size or the number of steps", file=sys.stderr)
        return 2
    except RecursionError:
        print("error: input nested too deeply to read", file=sys.stderr)
        return 2
    except OSError as e:  # a write that failed outside the checked paths: still one line
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {terminal_line(where)}{e.strerror or terminal_line(str(e))}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
