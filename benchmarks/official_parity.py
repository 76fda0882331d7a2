"""Official parity: densediff on converted official checkpoints against the official code's own
outputs (the dumps of ``benchmarks/official_oracle.py``).

Runs in densediff's venv; it never imports the official code. For every ``<name>.pth`` in
``--dumps`` it

1. converts the checkpoint with ``densediff convert`` (the CLI, in a subprocess) and loads the
   result with ``densediff.load``;
2. for every stage dump ``<name>_<H>x<W>.pt`` (the same normalised input to both sides): max
   |diff| of the 4 backbone maps (``model.encoder``), the neck map (``model.extract``), the
   time embedding and one decoder call (``model.denoise`` on the official neck, x_t and
   log-SNR), the start noise, every step's logits and the sampler's output (``sample_steps``
   with ``seeds=[seed]`` on densediff's own features), the full-resolution output
   (``uncertainty_maps``: accumulated probabilities, or softmax of the logits) and label
   agreement;
3. for every ``<name>_pipe_<h>x<w>.pt`` (the config's own test pipeline on an original uint8
   image): labels at the original size from ``Predictor.predict`` (densediff's resize), the
   resize itself against mmcv's cv2 result, and, to isolate the model side, densediff's
   pipeline fed the official normalised input;
4. for ``<name>_aug_<h>x<w>.pt``: the multi-scale + flip test, from the image
   (``Predictor.predict(aug=True)`` with the oracle's ratios) and from the official per-pass
   inputs (each through ``predict_probs``, flipped back, averaged as mmseg's ``aug_test``);
5. with ``--onnx NAME:HxW``: ``densediff export`` of the converted model at that size and the
   same stage comparison through ``densediff.load_onnx`` (onnxruntime).

Pass: max |diff| <= ``--tol`` (1e-4) on logits / probabilities and 100 % labels. Prints a
markdown table and writes it (and every number as JSON) next to ``--table``.

    .venv/bin/python benchmarks/official_parity.py --dumps /work/oracle/parity \
        --work /tmp/parity --table benchmarks/official_parity_table.md
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

TOL = 1e-4


def log(msg: str) -> None:
    print(f"[parity {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ numbers


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b|; NaN (and a note) when the shapes differ."""
    a, b = a.detach().float(), b.detach().float()
    if a.shape != b.shape:
        log(f"  shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
        return float("nan")
    return float((a - b).abs().max()) if a.numel() else 0.0


def agree(a: torch.Tensor, b: torch.Tensor) -> float:
    """% of equal labels (NaN when the shapes differ)."""
    if a.shape != b.shape:
        log(f"  label shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
        return float("nan")
    return 100.0 * float((a.long() == b.long()).float().mean())


def margins_at(scores: torch.Tensor, where: torch.Tensor) -> list[float]:
    """Top-1 minus top-2 of ``scores`` (K x H x W) at the pixels ``where`` (H x W bool)."""
    if not bool(where.any()):
        return []
    top = scores.topk(2, dim=0).values
    return sorted(float(v) for v in (top[0] - top[1])[where])


def fmt(x: float | None) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and math.isnan(x):
        return "shape≠"
    return f"{x:.1e}"


def fmt_pct(x: float | None) -> str:
    if x is None:
        return "–"
    if math.isnan(x):
        return "shape≠"
    return "100 %" if x == 100.0 else f"{x:.3f} %"


# ------------------------------------------------------------------------------ convert / load


def convert(pth: Path, out: Path, python: str) -> tuple[Path, float]:
    """``densediff convert SRC OUT`` in a subprocess; returns (what densediff.load takes, s)."""
    import shutil

    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    t0 = time.time()
    cmd = [python, "-m", "densediff.cli.main", "convert", str(pth), str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode == 2 and "invalid choice: 'convert'" in res.stderr:
        # a checkout without the CLI command yet: the API it wraps
        from densediff.official import convert as api_convert

        log("  no `densediff convert` command here; calling densediff.official.convert")
        api_convert(pth, out)
        return out, time.time() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n"
                           f"{res.stderr}")
    for line in (res.stdout + res.stderr).strip().splitlines()[-6:]:
        log(f"  convert: {line}")
    return out, time.time() - t0


def checkpoint_file(out: Path) -> Path:
    """The .safetensors file of a converted run folder (for ``export``)."""
    if out.is_file():
        return out
    found = sorted(out.rglob("*.safetensors"))
    best = [p for p in found if p.name == "best.safetensors"]
    if not (best or found):
        raise FileNotFoundError(f"no .safetensors under {out}")
    return (best or found)[0]


def load(out: Path):
    import densediff

    try:
        return densediff.load(str(out))
    except Exception as e:  # a run folder the API does not take yet: its checkpoint file
        log(f"  densediff.load({out}) failed ({type(e).__name__}: {str(e)[:120]}); "
            "loading its .safetensors")
        return densediff.load(str(checkpoint_file(out)))


# ------------------------------------------------------------------------------ comparisons


@torch.no_grad()
def compare_stages(model, d: dict) -> dict:
    """Every stage on the same normalised input (see the module doc)."""
    from densediff.diffusion.noise import seeded_normal
    from densediff.pipelines.segmentation import uncertainty_maps

    info = d["info"]
    img, seed, steps, acc = d["img"], info["seed"], info["steps"], info["accumulation"]
    h, w = img.shape[-2:]
    r: dict = {"size": f"{h}x{w}", "steps": steps, "accumulation": acc}
    t0 = time.time()
    feats = model.encoder(img)
    r["backbone"] = [maxdiff(f, d[f"backbone.{i}"]) for i, f in enumerate(feats)]
    neck = model.extract(img)
    r["neck"] = maxdiff(neck, d["neck"])
    # one decoder call on the official neck, x_t and t (isolates the decoder)
    log_snr = model.schedule(d["t"])
    r["log_snr"] = maxdiff(log_snr, d["log_snr"])
    if getattr(model, "time_mlp", None) is not None:
        r["time_emb"] = maxdiff(model.time_mlp(log_snr), d["time_emb"])
    r["fused"] = maxdiff(model.fuse(torch.cat([d["neck"], d["x_t"]], 1)), d["fused"])
    r["decoder"] = maxdiff(model.denoise(d["neck"], d["x_t"], log_snr), d["decoder_logits"])
    # the start noise densediff draws for seeds=[seed]
    fh, fw = d["neck"].shape[-2:]
    noise = seeded_normal(d["noise"].shape, [torch.Generator().manual_seed(seed)], "cpu")
    r["noise"] = maxdiff(noise, d["noise"])
    if model.default_steps != steps:
        log(f"  default steps {model.default_steps} != official {steps}")
    r["default_steps_match"] = model.default_steps == steps
    r["accumulation_match"] = bool(model.accumulation) == bool(acc)
    # the sampler on densediff's own features
    traj = model.sample_steps(neck, steps, seeds=[seed])
    ours_steps = traj.step_outputs()            # S x 1 x K x h x w
    r["step_logits"] = [maxdiff(a, b) for a, b in zip(ours_steps, d["step_logits"])]
    r["step_labels"] = [agree(a.argmax(1), b.argmax(1))
                        for a, b in zip(ours_steps, d["step_logits"])]
    sample = traj.output(acc)
    r["sample"] = maxdiff(sample, d["sample_out"])
    # the full-resolution output as densediff's pipeline forms it (whole image, no resize)
    probs, _, _ = uncertainty_maps(model, neck, steps, (h, w), acc, [seed])
    # official: seg_logit = the sampler output upsampled (accumulated: probabilities; mmseg
    # then applies softmax once more); not accumulated: mmseg's softmax of the upsampled logits
    ref = d["seg_logit"] if acc else d["probs"]
    r["full_res"] = maxdiff(probs, ref)
    r["full_res_vs"] = "seg_logit (upsampled mean step probs)" if acc else "softmax(seg_logit)"
    ours_lab, off_lab = probs.argmax(1)[0], d["labels"]
    r["labels"] = agree(ours_lab, off_lab)
    if ours_lab.shape == off_lab.shape:
        diff = ours_lab != off_lab
        r["labels_differ"] = int(diff.sum())
        r["official_margins_at_diff"] = margins_at(d["seg_logit"][0], diff)[:10]
        if "fp64.sample_out" in d and r["labels_differ"]:
            # the official model's own float64 labels: a pixel that float32 round-off decides
            # flips between the official float32 and float64 results too (or sides with ours)
            lab64 = F.interpolate(d["fp64.sample_out"], size=(h, w), mode="bilinear",
                                  align_corners=False).argmax(1)[0]
            r["labels_official_fp32_vs_fp64_at_diff"] = int((off_lab != lab64)[diff].sum())
            r["labels_ours_vs_official_fp64_at_diff"] = int((ours_lab != lab64)[diff].sum())
    if "fp64.neck" in d:
        r.update(compare_fp64(model, d, ours32={"backbone": feats, "neck": neck,
                                                 "step_logits": ours_steps}))
    r["seconds"] = round(time.time() - t0, 1)
    return r


@torch.no_grad()
def compare_fp64(model, d: dict, ours32: dict) -> dict:
    """Both sides in float64 (the oracle's ``--fp64`` dump): does the mapping compute the same
    function, with float32 round-off the only difference? Also the float32 round-off of each
    side, measured against the official float64 result."""
    import copy

    info = d["info"]
    seed, steps, acc = info["seed"], info["steps"], info["accumulation"]
    m64 = copy.deepcopy(model).double()
    img = d["img"].double()
    r: dict = {}
    feats = m64.encoder(img)
    r["fp64_backbone"] = [maxdiff(f, d[f"fp64.backbone.{i}"]) for i, f in enumerate(feats)]
    neck = m64.extract(img)
    r["fp64_neck"] = maxdiff(neck, d["fp64.neck"])
    ls = m64.schedule(d["t"].double())
    r["fp64_decoder"] = maxdiff(m64.denoise(d["fp64.neck"], d["x_t"].double(), ls),
                                d["fp64.decoder_logits"])
    traj = m64.sample_steps(neck, steps, seeds=[seed])
    st = traj.step_outputs()
    r["fp64_step_logits"] = [maxdiff(a, b) for a, b in zip(st, d["fp64.step_logits"])]
    r["fp64_step_labels"] = [agree(a.argmax(1), b.argmax(1))
                             for a, b in zip(st, d["fp64.step_logits"])]
    r["fp64_sample"] = maxdiff(traj.output(acc),
                               d["fp64.sample_out"])
    # float32 round-off of each side against the official float64 result
    r["roundoff_official"] = {
        "backbone": worst([maxdiff(d[f"backbone.{i}"], d[f"fp64.backbone.{i}"])
                           for i in range(4)]),
        "neck": maxdiff(d["neck"], d["fp64.neck"]),
        "decoder": maxdiff(d["decoder_logits"], d["fp64.decoder_logits"]),
        "step_logits": worst([maxdiff(a, b) for a, b in zip(d["step_logits"],
                                                            d["fp64.step_logits"])])}
    r["roundoff_ours"] = {
        "backbone": worst([maxdiff(f, d[f"fp64.backbone.{i}"])
                           for i, f in enumerate(ours32["backbone"])]),
        "neck": maxdiff(ours32["neck"], d["fp64.neck"]),
        "step_logits": worst([maxdiff(a, b) for a, b in zip(ours32["step_logits"],
                                                            d["fp64.step_logits"])])}
    return r


def _double_resize(seg: torch.Tensor, in_size, out_size) -> torch.Tensor:
    """mmseg whole inference: the decoder-grid output upsampled to the network input size
    (encode_decode), then resized to the original size (whole_inference, rescale)."""
    x = F.interpolate(seg, size=tuple(in_size), mode="bilinear", align_corners=False)
    return F.interpolate(x, size=tuple(out_size), mode="bilinear", align_corners=False)


@torch.no_grad()
def compare_pipeline(pred, d: dict) -> dict:
    """The config's own test pipeline (whole image, no aug)."""
    from densediff.data.transforms import (
        preprocess_image,
        rescale_size,
        resize_image,
    )

    model, info = pred.model, d["info"]
    rgb = d["image_rgb"].numpy()
    seed, steps, acc = info["seed"], info["steps"], info["accumulation"]
    oh, ow = rgb.shape[:2]
    p0 = d["passes"][0]
    x_off = p0["img"]
    ih, iw = x_off.shape[-2:]
    r: dict = {"original": f"{oh}x{ow}", "input": f"{ih}x{iw}"}
    t0 = time.time()
    # the resize: densediff's rescale_size + resize_image vs mmcv.imrescale (cv2, BGR)
    size = rescale_size((oh, ow), tuple(pred.cfg.data.test_scale)) if \
        pred.cfg.data.test_scale is not None else (oh, ow)
    r["resize_size_match"] = tuple(size) == (ih, iw)
    mm = d["resized_bgr"][0].numpy()[..., ::-1]
    ours = resize_image(rgb, size)
    if ours.shape == mm.shape:
        dd = np.abs(ours.astype(np.int16) - mm.astype(np.int16))
        r["resize_px_differ_pct"] = 100.0 * float((dd.max(2) > 0).mean())
        r["resize_max_abs"] = int(dd.max())
    # (a) end to end from the uint8 image: Predictor.predict
    out = pred.predict(rgb, steps=steps, seed=seed)
    r["labels_e2e"] = agree(torch.from_numpy(out.mask), d["labels"])
    r["input_e2e"] = maxdiff(preprocess_image(rgb, pred.cfg), x_off)
    # (b) the official normalised input through densediff's pipeline (model side only)
    outb = pred.pipeline.predict(pred, rgb, x_off, False, steps, seed)
    lab_b = torch.from_numpy(outb.mask)
    r["labels_same_input"] = agree(lab_b, d["labels"])
    probs_b = torch.from_numpy(outb.probs)[None]
    # mmseg's inference() output is the softmax of the rescaled seg logit; with accumulation
    # that seg logit is the mean of the step probabilities, which densediff's whole-image
    # output is (no second softmax): compared after applying that softmax to ours
    r["probs_same_input"] = maxdiff(probs_b.softmax(1) if acc else probs_b, d["probs"])
    r["probs_same_input_vs"] = ("softmax(ours) vs mmseg inference() output" if acc
                                else "mmseg inference() output")
    # (c) densediff's own trajectory, resized as mmseg does (to the input size, then to the
    #     original): does the resize order explain what (b) leaves?
    feat = model.extract(x_off)
    traj = model.sample_steps(feat, steps, seeds=[seed])
    seg = traj.output(acc)
    ref = _double_resize(seg, (ih, iw), (oh, ow)).softmax(1)
    r["probs_mmseg_resize_order"] = maxdiff(ref, d["probs"])
    r["labels_mmseg_resize_order"] = agree(ref.argmax(1)[0], d["labels"])
    if lab_b.shape == d["labels"].shape:
        diff = lab_b != d["labels"]
        r["labels_differ_same_input"] = int(diff.sum())
        r["official_margins_at_diff"] = margins_at(d["probs"][0], diff)[:10]
    r["seconds"] = round(time.time() - t0, 1)
    return r


@torch.no_grad()
def compare_aug(pred, d: dict) -> dict:
    """Multi-scale + flip (mmseg aug_test) with the oracle's ratios."""
    from densediff.pipelines.inference import predict_probs

    model, info = pred.model, d["info"]
    rgb = d["image_rgb"].numpy()
    seed, steps = info["seed"], info["steps"]
    oh, ow = rgb.shape[:2]
    ratios = list(info["pipeline"]["img_ratios"])
    flip = bool(info["pipeline"]["flip"])
    r: dict = {"original": f"{oh}x{ow}", "ratios": ratios, "flip": flip,
               "passes": len(d["passes"]),
               "inputs": [f"{p['img'].shape[-2]}x{p['img'].shape[-1]}" for p in d["passes"]]}
    t0 = time.time()
    # (a) from the image: Predictor.predict(aug=True), cfg.eval.aug set to the oracle's test
    saved = pred.cfg.eval.aug.model_copy(deep=True)
    pred.cfg.eval.aug.scales = ratios
    pred.cfg.eval.aug.flip = flip
    try:
        out = pred.predict(rgb, aug=True, steps=steps, seed=seed)
    finally:
        pred.cfg.eval.aug = saved
    r["labels_e2e"] = agree(torch.from_numpy(out.mask), d["labels"])
    # (b) the official per-pass inputs, each through predict_probs, flipped back, averaged
    total = None
    for p in d["passes"]:
        pr = predict_probs(model, p["img"], pred.cfg.eval, ori_size=(oh, ow), aug=False,
                           steps=steps, seeds=[seed])
        if p["flip"]:
            pr = pr.flip(-1)
        total = pr if total is None else total + pr
    probs = total / len(d["passes"])
    r["probs_same_inputs"] = maxdiff(probs, d["probs"])
    lab = probs.argmax(1)[0]
    r["labels_same_inputs"] = agree(lab, d["labels"])
    if lab.shape == d["labels"].shape:
        diff = lab != d["labels"]
        r["labels_differ_same_inputs"] = int(diff.sum())
        r["official_margins_at_diff"] = margins_at(d["probs"][0], diff)[:10]
    r["seconds"] = round(time.time() - t0, 1)
    return r


@torch.no_grad()
def compare_onnx(ckpt: Path, d: dict, work: Path, python: str) -> dict:
    """``densediff export`` at the dump's size, then the stages through onnxruntime."""
    import shutil

    import densediff

    info = d["info"]
    img, seed, steps, acc = d["img"], info["seed"], info["steps"], info["accumulation"]
    h, w = img.shape[-2:]
    out = work / f"onnx_{h}x{w}"
    if out.exists():
        shutil.rmtree(out)
    t0 = time.time()
    cmd = [python, "-m", "densediff.cli.main", "export", str(ckpt), "--out", str(out),
           "--size", str(h), str(w)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}")
    r: dict = {"size": f"{h}x{w}", "export_s": round(time.time() - t0, 1)}
    pred = densediff.load_onnx(str(out), threads=1)
    m = pred.model
    neck = m.extract(img)
    r["neck"] = maxdiff(neck, d["neck"])
    log_snr = m.schedule(d["t"])
    r["decoder"] = maxdiff(m.denoise_step(d["neck"], d["x_t"], log_snr)[0], d["decoder_logits"])
    traj = m.sample_steps(neck, steps, seeds=[seed])
    ours_steps = traj.step_outputs()
    r["step_logits"] = [maxdiff(a, b) for a, b in zip(ours_steps, d["step_logits"])]
    r["step_labels"] = [agree(a.argmax(1), b.argmax(1))
                        for a, b in zip(ours_steps, d["step_logits"])]
    sample = traj.output(acc)
    r["sample"] = maxdiff(sample, d["sample_out"])
    up = F.interpolate(sample, size=(h, w), mode="bilinear", align_corners=False)
    probs = up if acc else up.softmax(1)
    r["full_res"] = maxdiff(probs, d["seg_logit"] if acc else d["probs"])
    r["labels"] = agree(probs.argmax(1)[0], d["labels"])
    # and the Predictor path of the onnx model on the uint8 image (no resize at this size:
    # the converted config's test resize is bypassed by feeding the normalised input)
    outp = pred.pipeline.predict(pred, d["image_rgb"].numpy(), img, False, steps, seed)
    r["labels_predictor"] = agree(torch.from_numpy(outp.mask), d["labels"])
    r["seconds"] = round(time.time() - t0, 1)
    return r


# ------------------------------------------------------------------------------ report


def worst(vals) -> float:
    vals = [v for v in (vals if isinstance(vals, list) else [vals]) if v is not None]
    if any(isinstance(v, float) and math.isnan(v) for v in vals):
        return float("nan")
    return max(vals) if vals else None


def passed(r: dict, keys_diff: list[str], keys_lab: list[str], tol: float) -> bool:
    for k in keys_diff:
        v = worst(r.get(k))
        if v is None:
            continue
        if math.isnan(v) or v > tol:
            return False
    for k in keys_lab:
        v = r.get(k)
        if v is None:
            continue
        if math.isnan(v) or v < 100.0:
            return False
    return True


def fp64_cell(r: dict) -> str:
    if "fp64_neck" not in r:
        return "–"
    enc = worst(r["fp64_backbone"] + [r["fp64_neck"]])
    return f"{fmt(enc)} / {fmt(worst(r['fp64_step_logits']))}"


def tables(results: dict, tol: float) -> str:
    lines = [f"Stage parity (same normalised input to both; pass: max |diff| <= {tol:g}, "
             "100 % labels)", "",
             "| model | input | backbone (4 maps) | neck | time emb | decoder call | noise | "
             "step logits (worst) | sample output | full-res output | labels | pass | "
             "float64: backbone+neck / steps |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        for r in res.get("stages", []):
            ok = passed(r, ["backbone", "neck", "time_emb", "decoder", "noise", "step_logits",
                            "sample", "full_res"], ["labels"], tol)
            lines.append(
                f"| {name} | {r['size']} | {fmt(worst(r['backbone']))} | {fmt(r['neck'])} | "
                f"{fmt(r.get('time_emb'))} | {fmt(r['decoder'])} | {fmt(r['noise'])} | "
                f"{fmt(worst(r['step_logits']))} | {fmt(r['sample'])} | {fmt(r['full_res'])} | "
                f"{fmt_pct(r['labels'])} | {'yes' if ok else '**no**'} | {fp64_cell(r)} |")
    pipe_rows = [(n, r) for n, res in results.items() for r in res.get("pipeline", [])]
    if pipe_rows:
        lines += ["", "Config test pipeline (whole image; labels at the original size; "
                  "e2e = from the uint8 image with densediff's resize; same input = the "
                  "official normalised input)", "",
                  "| model | original → input | resized uint8: px differing / max | labels e2e | "
                  "labels same input | probs same input | labels, mmseg resize order | pass |",
                  "|---|---|---|---|---|---|---|---|"]
        for n, r in pipe_rows:
            ok = passed(r, ["probs_same_input"], ["labels_e2e", "labels_same_input"], tol)
            rz = (f"{r['resize_px_differ_pct']:.2f} % / {r['resize_max_abs']}"
                  if "resize_px_differ_pct" in r else "size≠")
            lines.append(f"| {n} | {r['original']} → {r['input']} | {rz} | "
                         f"{fmt_pct(r['labels_e2e'])} | "
                         f"{fmt_pct(r['labels_same_input'])} | "
                         f"{fmt(r['probs_same_input'])} | "
                         f"{fmt_pct(r['labels_mmseg_resize_order'])} | "
                         f"{'yes' if ok else '**no**'} |")
    aug_rows = [(n, r) for n, res in results.items() for r in res.get("aug", [])]
    if aug_rows:
        lines += ["", "Multi-scale + flip (mmseg aug_test)", "",
                  "| model | original | ratios, flip | passes (inputs) | labels e2e | "
                  "labels same inputs | probs same inputs | pass |",
                  "|---|---|---|---|---|---|---|---|"]
        for n, r in aug_rows:
            ok = passed(r, ["probs_same_inputs"], ["labels_e2e", "labels_same_inputs"], tol)
            lines.append(f"| {n} | {r['original']} | {r['ratios']}, {r['flip']} | "
                         f"{r['passes']} ({', '.join(r['inputs'])}) | "
                         f"{fmt_pct(r['labels_e2e'])} | {fmt_pct(r['labels_same_inputs'])} | "
                         f"{fmt(r['probs_same_inputs'])} | {'yes' if ok else '**no**'} |")
    onnx_rows = [(n, r) for n, res in results.items() for r in res.get("onnx", [])]
    if onnx_rows:
        lines += ["", "densediff export + onnxruntime against the official code", "",
                  "| model | input | neck | decoder call | step logits (worst) | sample output | "
                  "full-res output | labels | labels (Predictor) | pass |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for n, r in onnx_rows:
            ok = passed(r, ["neck", "decoder", "step_logits", "sample", "full_res"],
                        ["labels", "labels_predictor"], tol)
            lines.append(f"| {n} | {r['size']} | {fmt(r['neck'])} | {fmt(r['decoder'])} | "
                         f"{fmt(worst(r['step_logits']))} | {fmt(r['sample'])} | "
                         f"{fmt(r['full_res'])} | {fmt_pct(r['labels'])} | "
                         f"{fmt_pct(r['labels_predictor'])} | {'yes' if ok else '**no**'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dumps", required=True, type=Path, help="official_oracle.py's --out")
    ap.add_argument("--work", required=True, type=Path, help="converted models go here")
    ap.add_argument("--models", default=None, help="comma-separated names (default: every "
                    ".pth in --dumps)")
    ap.add_argument("--onnx", default=None, help="NAME:HxW[,NAME:HxW...]: export that model at "
                    "that size and compare onnxruntime too (a stage dump of that size must "
                    "exist)")
    ap.add_argument("--table", type=Path, default=None, help="write the markdown here (and "
                    "the numbers to the same path with .json)")
    ap.add_argument("--only", default=None, help="compare only the dumps whose file name "
                    "matches this regular expression (e.g. 'aug_' or '240x328')")
    ap.add_argument("--tol", type=float, default=TOL)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    python = sys.executable
    args.work.mkdir(parents=True, exist_ok=True)
    names = (args.models.split(",") if args.models else
             sorted(p.stem for p in args.dumps.glob("*.pth")))
    onnx_cases = {tuple(c.split(":")) for c in args.onnx.split(",")} if args.onnx else set()
    results: dict = {}
    json_path = args.table.with_suffix(".json") if args.table else None
    for name in names:
        pth = args.dumps / f"{name}.pth"
        res: dict = {"stages": [], "pipeline": [], "aug": [], "onnx": []}
        results[name] = res
        try:
            out, secs = convert(pth, args.work / name, python)
            res["convert_s"] = round(secs, 1)
            pred = load(out)
            pred.model.eval()
            log(f"{name}: converted in {secs:.1f} s, loaded "
                f"({sum(p.numel() for p in pred.model.parameters()) / 1e6:.2f} M parameters)")
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {e}"
            log(f"{name}: {res['error']}")
            continue
        dumps = sorted(args.dumps.glob(f"{name}_*.pt"))
        for f in dumps:
            kind = re.fullmatch(rf"{re.escape(name)}_(?:(pipe|aug)_)?(\d+x\d+)\.pt", f.name)
            if not kind or (args.only and not re.search(args.only, f.name)):
                continue
            d = torch.load(f, weights_only=False)
            try:
                if kind.group(1) == "pipe":
                    r = compare_pipeline(pred, d)
                    res["pipeline"].append(r)
                elif kind.group(1) == "aug":
                    r = compare_aug(pred, d)
                    res["aug"].append(r)
                else:
                    r = compare_stages(pred.model, d)
                    res["stages"].append(r)
                    if (name, kind.group(2)) in onnx_cases:
                        res["onnx"].append(compare_onnx(checkpoint_file(out), d,
                                                        args.work / name, python))
            except Exception as e:
                import traceback

                traceback.print_exc()
                res.setdefault("errors", []).append(f"{f.name}: {type(e).__name__}: {e}")
                continue
            log(f"{f.name}: {json.dumps(r)[:600]}")
        if json_path:
            json_path.write_text(json.dumps(results, indent=1))
    text = tables(results, args.tol)
    errors = {n: r.get("error") or r.get("errors") for n, r in results.items()
              if r.get("error") or r.get("errors")}
    if errors:
        text += "\nErrors:\n" + "".join(f"- {n}: {e}\n" for n, e in errors.items())
    print(text)
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(text)
        json_path.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
