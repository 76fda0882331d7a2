"""The official DDP code as an oracle: random official weights, saved as a released checkpoint
would be, and every stage's output dumped for ``benchmarks/official_parity.py`` to compare with.

Runs in the ORACLE's venv (official repo + mmcv 1.7.2 pure-Python + the shims of
``../shared/tools/official-oracle``), never in densediff's; densediff does not import this file
and nothing of the official code is copied here: it is imported from ``$DENSEDIFF_ORACLE/DDP``.

    $DENSEDIFF_ORACLE/venv/bin/python benchmarks/official_oracle.py \
        ddp_swin_t_2x8_512x512_160k_ade20k --out OUT --sizes 256x256,240x328 \
        --pipeline 200x236 [--aug 0.5,0.75,1.0 --aug-flip]

For one official config it

1. builds the official model (weights seeded by ``--seed`` and the name), perturbs every
   parameter and BN statistic away from its initial value (norm weights/biases, layer-scale
   gammas, biases, MSDA sampling offsets and attention weights, relative-position tables, the
   label embedding, the time MLP: every weight then matters), and saves it with mmcv's own
   ``save_checkpoint`` as ``OUT/<name>.pth``, with a meta like the one mmseg training writes
   (CLASSES, PALETTE, the config text, a keep-best hook's numpy score, versions, iteration)
   and, with ``--optimizer``, an AdamW state;
2. for each ``--sizes`` HxW (a synthetic image, normalised as mmseg does, no resize), dumps
   ``OUT/<name>_<H>x<W>.pt``: the input, the 4 backbone maps, the neck map, one decoder call at a
   fixed x_t and t, the sampler's start noise, every step's logits, ``ddim_sample``'s output,
   the upsampled seg logit (``encode_decode``), mmseg's ``inference`` probabilities and labels;
   with ``--fp64`` also backbone, neck, decoder call and sampler of the model in float64;
3. with ``--pipeline``, runs a synthetic uint8 image of that original size through the config's
   own test pipeline (``mmseg.apis.inference_segmentor``: LoadImage, MultiScaleFlipAug(Resize
   keep_ratio to img_scale, RandomFlip, Normalize), whole mode) and dumps
   ``OUT/<name>_pipe_<H>x<W>.pt``: the original image, the cv2-resized image, the normalised
   input, the probabilities and labels at the original size; with ``--aug`` the same through
   ``aug_test`` (MultiScaleFlipAug with ``img_ratios`` and ``flip``), every pass's input kept.

The starting noise is the one densediff draws for ``seeds=[seed]``:
``torch.randn((R, 256, h, w), generator=torch.Generator().manual_seed(seed))``
(``densediff.diffusion.samplers.sample_map`` / ``seeded_normal``); ``torch.randn`` is patched
for the duration of each official sampling call to return it.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
import zlib
from pathlib import Path

ORACLE = Path(os.environ.get("DENSEDIFF_ORACLE", "/work/oracle"))
SEG = ORACLE / "DDP" / "segmentation"
sys.path[:0] = [str(SEG), str(ORACLE / "shims")]

# the shim must be imported before mmcv.runner and mmseg: keep this order
# isort: off
import mmcv_lite_ops_shim  # noqa: E402,F401
import numpy as np  # noqa: E402
import torch  # noqa: E402

import mmcv  # noqa: E402
from mmcv.runner import save_checkpoint  # noqa: E402

from mmseg.apis import inference_segmentor  # noqa: E402
from mmseg.models import build_segmentor  # noqa: E402
# isort: on

CONFIGS = {
    **{f"ddp_swin_{s}_2x8_512x512_160k_ade20k": "configs/ade" for s in "tsbl"},
    **{f"ddp_convnext_{s}_4x4_512x1024_160k_cityscapes": "configs/cityscapes" for s in "tsbl"},
    **{f"ddp_convnext_{s}_4x4_512x1024_5k_cityscapes_aligned": "configs/cityscapes"
       for s in "tl"},
}


def log(msg: str) -> None:
    print(f"[oracle {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_size(s: str) -> tuple[int, int]:
    h, w = s.lower().split("x")
    return int(h), int(w)


# ------------------------------------------------------------------------------ the model


def build(name: str, seed: int):
    cfg = mmcv.Config.fromfile(str(SEG / CONFIGS[name] / f"{name}.py"))
    cfg.model.pretrained = None
    cfg.model.backbone.init_cfg = None
    cfg.model.train_cfg = None
    torch.manual_seed(seed)
    np.random.seed(seed)
    logging.getLogger("mmcv").setLevel(logging.WARNING)  # init_weights' per-parameter log
    model = build_segmentor(cfg.model, test_cfg=cfg.get("test_cfg"))
    model.init_weights()
    model.cfg = cfg
    return model.eval(), cfg


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int) -> dict[str, int]:
    """Move every parameter and float buffer away from its initial value.

    1-D tensors (norm weights/biases, biases, layer-scale gammas, the sinusoidal time weights,
    MSDA sampling-offset biases): ``p (1 + 0.1 n) + 0.05 n'``. The MSDA ``sampling_offsets`` and
    ``attention_weights`` matrices are zero at init: set to ``0.01 n``. Relative-position bias
    tables: ``+ 0.02 n``. Other matrices (already random): ``p (1 + 0.05 n)``. BN running means
    ``+ 0.1 n``, running variances ``x exp(0.2 n)``, ``num_batches_tracked`` = 160000. Integer
    buffers (Swin's relative-position index) stay: they are derived. The decode head's
    classifier is then scaled by 4 (confident logits, as a trained model's).
    """
    g = torch.Generator().manual_seed(seed + 7919)

    def n(t):
        return torch.randn(t.shape, generator=g, dtype=t.dtype)

    counts = {"param": 0, "zero_init_set": 0, "buffer": 0}
    for name, p in model.named_parameters():
        counts["param"] += 1
        if name.endswith(("sampling_offsets.weight", "attention_weights.weight")):
            p.copy_(0.01 * n(p))
            counts["zero_init_set"] += 1
        elif "relative_position_bias_table" in name:
            p.add_(0.02 * n(p))
        elif p.ndim == 1:
            p.mul_(1 + 0.1 * n(p)).add_(0.05 * n(p))
        else:
            p.mul_(1 + 0.05 * n(p))
    # a trained model's logits are far from uniform: scale the classifier so that the argmax
    # margins are not all near-ties (a random head gives logits of std ~1 over 150 classes)
    model.decode_head.conv_seg.weight.mul_(4.0)
    model.decode_head.conv_seg.bias.mul_(4.0)
    for name, b in model.named_buffers():
        if name.endswith("running_mean"):
            b.add_(0.1 * n(b))
        elif name.endswith("running_var"):
            b.mul_(torch.exp(0.2 * n(b)))
        elif name.endswith("num_batches_tracked"):
            b.fill_(160000)
        else:
            continue
        counts["buffer"] += 1
    return counts


def save_released(model, cfg, name: str, out: Path, optimizer: bool) -> Path:
    """Save as mmseg 0.x training does: ``mmcv.runner.save_checkpoint(model, f, optimizer,
    meta)`` with the meta of ``train_segmentor`` + IterBasedRunner + EvalHook(save_best)."""
    ds = cfg.data.test.type
    from mmseg.datasets import DATASETS

    dcls = DATASETS.get(ds)
    meta = dict(
        env_info="sys.platform: linux\nPython: 3.8.13\nCUDA available: True\n"
                 "GPU 0,1,2,3,4,5,6,7: NVIDIA A100-SXM4-80GB\nPyTorch: 1.12.1\nMMCV: 1.7.0",
        seed=int(np.int64(1234567)),
        exp_name=f"{name}.py",
        mmseg_version="0.30.0+",
        config=cfg.pretty_text,
        CLASSES=tuple(dcls.CLASSES),
        PALETTE=[list(map(int, c)) for c in dcls.PALETTE],
        epoch=1,
        iter=160000,
        hook_msgs=dict(
            last_ckpt=f"work_dirs/{name}/iter_160000.pth",
            best_score=np.float64(0.4712345),     # mmseg's EvalHook keeps a numpy float
            best_ckpt=f"work_dirs/{name}/best_mIoU_iter_144000.pth"),
    )
    opt = None
    if optimizer:
        # an AdamW state as the runner saves it (lr 0 and zero grads: the weights do not move)
        opt = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.01)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        model.zero_grad(set_to_none=True)
    path = out / f"{name}.pth"
    save_checkpoint(model, str(path), optimizer=opt, meta=meta)
    return path


# ------------------------------------------------------------------------------ inputs


def synthetic_image(h: int, w: int, seed: int) -> np.ndarray:
    """A uint8 RGB H x W x 3 test image: smooth random colour fields plus fine noise (so the
    features vary over the image and the labels form regions)."""
    from PIL import Image

    rng = np.random.default_rng([seed, h, w])
    base = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC), np.float32)
    blobs = rng.integers(0, 256, size=(max(2, h // 24), max(2, w // 24), 3), dtype=np.uint8)
    fine = np.asarray(Image.fromarray(blobs).resize((w, h), Image.NEAREST), np.float32)
    img = 0.7 * smooth + 0.3 * fine + rng.normal(0, 6, size=(h, w, 3))
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def normalise(rgb: np.ndarray, cfg) -> torch.Tensor:
    n = cfg.img_norm_cfg
    x = (rgb.astype(np.float32) - np.asarray(n.mean, np.float32)) / np.asarray(n.std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


class SeededNoise:
    """Patch ``torch.randn`` while the official sampler runs: a call with the start-noise shape
    (R, C, h, w) gets densediff's seeded draw; any other call fails loudly."""

    def __init__(self, seed: int, channels: int, dtype: torch.dtype = torch.float32):
        self.seed, self.channels, self.dtype, self.drawn = seed, channels, dtype, []

    def __enter__(self):
        self._orig = torch.randn
        orig, me = self._orig, self

        def randn(*shape, **kw):
            if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
                shape = tuple(shape[0])
            if len(shape) != 4 or shape[1] != me.channels:
                raise RuntimeError(f"unexpected torch.randn{shape} in the official sampler")
            g = torch.Generator().manual_seed(me.seed)
            t = orig(tuple(shape), generator=g, dtype=me.dtype)
            me.drawn.append(t.clone())
            return t.to(kw.get("device") or "cpu")

        torch.randn = randn
        return self

    def __exit__(self, *exc):
        torch.randn = self._orig


class StepRecorder:
    """Record every decoder call of the official sampler (``_decode_head_forward_test``)."""

    def __init__(self, model):
        self.model, self.logits = model, []

    def __enter__(self):
        orig = self.model._decode_head_forward_test

        def rec(x, t, img_metas):
            out = orig(x, t, img_metas)
            self.logits.append(out.detach().clone())
            return out

        self.model._decode_head_forward_test = rec
        return self

    def __exit__(self, *exc):
        del self.model._decode_head_forward_test


# ------------------------------------------------------------------------------ dumps


@torch.no_grad()
def dump_stages(model, cfg, name: str, size: tuple[int, int], seed: int, out: Path,
                fp64: bool = False) -> Path:
    h, w = size
    rgb = synthetic_image(h, w, seed)
    img = normalise(rgb, cfg)
    d: dict[str, torch.Tensor | object] = {"image_rgb": torch.from_numpy(rgb), "img": img}
    t0 = time.time()
    feats = model.backbone(img)
    for i, f in enumerate(feats):
        d[f"backbone.{i}"] = f
    neck = model.neck(feats)[0]
    d["neck"] = neck
    # one decoder call at a fixed x_t and t
    c, fh, fw = model.decode_head.in_channels[0], neck.shape[2], neck.shape[3]
    g = torch.Generator().manual_seed(seed + 1)
    x_t = torch.randn((1, c, fh, fw), generator=g) * 0.6
    t = torch.tensor([0.5])
    log_snr = model.log_snr(t)
    time_emb = model.time_mlp(log_snr)
    fused = model.transform(torch.cat([neck, x_t], 1))
    logits = model.decode_head.forward_test([fused], time_emb, None, model.test_cfg)
    d.update(x_t=x_t, t=t, log_snr=log_snr, time_emb=time_emb, fused=fused,
             decoder_logits=logits)
    # the full sampler (model.ddim_sample) with densediff's seeded noise
    meta = [dict(ori_shape=(h, w, 3), img_shape=(h, w, 3), pad_shape=(h, w, 3), flip=False)]
    with SeededNoise(seed, c) as noise, StepRecorder(model) as rec:
        sample_out = model.ddim_sample(neck, meta)
    d["noise"] = noise.drawn[0]
    d["step_logits"] = torch.stack(rec.logits)            # S x 1 x K x h x w
    d["sample_out"] = sample_out                          # mean probs (acc.) or last logits
    with SeededNoise(seed, c) as noise:
        seg_logit = model.encode_decode(img, meta)        # upsampled to H x W
    d["seg_logit"] = seg_logit
    with SeededNoise(seed, c):
        probs = model.inference(img, meta, rescale=True)  # mmseg: softmax(seg_logit)
    d["probs"] = probs
    d["labels"] = probs.argmax(1)[0]
    if fp64:
        # the same model and inputs in float64 (densediff's float64 sampler draws its start
        # noise in float64): float32 round-off of either side then shows as the difference
        # between its float32 and float64 results
        m64 = copy.deepcopy(model).double()
        img64 = img.double()
        feats64 = m64.backbone(img64)
        for i, f in enumerate(feats64):
            d[f"fp64.backbone.{i}"] = f
        neck64 = m64.neck(feats64)[0]
        d["fp64.neck"] = neck64
        emb64 = m64.time_mlp(log_snr.double())
        fused64 = m64.transform(torch.cat([neck64, x_t.double()], 1))
        d["fp64.decoder_logits"] = m64.decode_head.forward_test([fused64], emb64, None,
                                                               m64.test_cfg)
        with SeededNoise(seed, c, torch.float64), StepRecorder(m64) as rec64:
            d["fp64.sample_out"] = m64.ddim_sample(neck64, meta)
        d["fp64.step_logits"] = torch.stack(rec64.logits)
        del m64
    d["info"] = dict(name=name, size=[h, w], seed=seed, steps=int(model.timesteps),
                     accumulation=bool(model.accumulation), randsteps=int(model.randsteps),
                     sample_range=list(model.sample_range), td=model.time_difference,
                     bit_scale=model.bit_scale, seconds=round(time.time() - t0, 1))
    path = out / f"{name}_{h}x{w}.pt"
    torch.save(d, path)
    log(f"{path.name}: feat {tuple(neck.shape)}, {len(rec.logits)} steps, "
        f"{time.time() - t0:.1f} s")
    return path


class ResizeRecorder:
    """Record the uint8 images mmseg's Resize produces (``mmcv.imrescale``)."""

    def __enter__(self):
        self.images = []
        self._orig = mmcv.imrescale
        orig, me = self._orig, self

        def imrescale(img, scale, *a, **kw):
            res = orig(img, scale, *a, **kw)
            me.images.append((np.array(res[0] if isinstance(res, tuple) else res),
                              tuple(scale) if not np.isscalar(scale) else scale))
            return res

        mmcv.imrescale = imrescale
        return self

    def __exit__(self, *exc):
        mmcv.imrescale = self._orig


class InferenceRecorder:
    """Record each pass of mmseg's whole inference: input, meta, output probabilities."""

    def __init__(self, model):
        self.model, self.passes, self.total = model, [], None

    def __enter__(self):
        orig = self.model.inference

        def inference(img, img_meta, rescale):
            out = orig(img, img_meta, rescale)
            m = img_meta[0]
            rec = dict(img=img.detach().clone(), flip=bool(m["flip"]),
                       img_shape=list(m["img_shape"]), ori_shape=list(m["ori_shape"]),
                       scale_factor=np.asarray(m["scale_factor"]).tolist(),
                       labels=out.argmax(1)[0].clone())
            self.total = out.clone() if self.total is None else self.total + out
            self.passes.append(rec)
            return out

        self.model.inference = inference
        return self

    def __exit__(self, *exc):
        del self.model.inference


@torch.no_grad()
def dump_pipeline(model, cfg, name: str, size: tuple[int, int], seed: int, out: Path,
                  aug_ratios: list[float] | None, aug_flip: bool) -> list[Path]:
    """The config's own test pipeline on a synthetic original image (BGR in, as mmcv.imread
    gives); whole mode; then optionally aug_test."""
    h, w = size
    rgb = synthetic_image(h, w, seed + 100)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    c = model.decode_head.in_channels[0]
    paths = []
    runs = [("pipe", None, False)]
    if aug_ratios:
        runs.append(("aug", aug_ratios, aug_flip))
    for tag, ratios, flip in runs:
        t0 = time.time()
        tp = copy.deepcopy(cfg.data.test.pipeline[1])
        if ratios is not None:
            tp.img_ratios = list(ratios)
            tp.flip = flip
        model.cfg = copy.deepcopy(cfg)
        model.cfg.data.test.pipeline = [cfg.data.test.pipeline[0], tp]
        with ResizeRecorder() as rs, SeededNoise(seed, c), \
                InferenceRecorder(model) as inf:
            result = inference_segmentor(model, bgr)
        labels = torch.from_numpy(np.asarray(result[0])).long()
        # whole: mmseg's inference probabilities; aug_test: their mean over the passes
        # (what aug_test takes the argmax of)
        probs = inf.total / len(inf.passes)
        d = {"image_rgb": torch.from_numpy(rgb), "labels": labels, "probs": probs,
             "resized_bgr": [torch.from_numpy(im) for im, _ in rs.images],
             "resize_scales": [s for _, s in rs.images],
             "passes": inf.passes,
             "info": dict(name=name, original=[h, w], seed=seed, tag=tag,
                          pipeline=json.loads(json.dumps(tp.to_dict() if hasattr(tp, "to_dict")
                                                         else dict(tp))),
                          test_cfg=dict(model.test_cfg), steps=int(model.timesteps),
                          accumulation=bool(model.accumulation),
                          labels_equal_argmax=bool((probs.argmax(1)[0] == labels).all()),
                          seconds=None)}
        model.cfg = cfg
        d["info"]["seconds"] = round(time.time() - t0, 1)
        path = out / f"{name}_{tag}_{h}x{w}.pt"
        torch.save(d, path)
        paths.append(path)
        log(f"{path.name}: {len(inf.passes)} pass(es), inputs "
            f"{[tuple(p['img'].shape[-2:]) for p in inf.passes]}, {time.time() - t0:.1f} s")
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name", choices=sorted(CONFIGS))
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sizes", default="256x256,240x328",
                    help="comma-separated HxW for the stage dumps (no resize)")
    ap.add_argument("--pipeline", default=None,
                    help="HxW of an original image for the config's test pipeline")
    ap.add_argument("--aug", default=None,
                    help="comma-separated img_ratios for aug_test (MultiScaleFlipAug)")
    ap.add_argument("--aug-flip", action="store_true")
    ap.add_argument("--optimizer", action="store_true",
                    help="also save an AdamW state in the checkpoint")
    ap.add_argument("--fp64", action="store_true", help="also dump the stages of the same "
                    "model in float64 (backbone, neck, decoder call, sampler)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    # the weights' seed also depends on the name, so that two releases of one architecture
    # (the 160k model and its self-aligned fine-tune) get different weights
    wseed = args.seed * 1000 + zlib.crc32(args.name.encode()) % 1000
    model, cfg = build(args.name, wseed)
    counts = perturb(model, wseed)
    log(f"{args.name}: built and perturbed (weight seed {wseed}, {counts}), "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    path = save_released(model, cfg, args.name, args.out, args.optimizer)
    log(f"saved {path} ({path.stat().st_size / 2**20:.0f} MiB) with mmcv.runner.save_checkpoint")
    for s in [x for x in args.sizes.split(",") if x]:
        dump_stages(model, cfg, args.name, parse_size(s), args.seed, args.out, args.fp64)
    if args.pipeline:
        ratios = [float(r) for r in args.aug.split(",")] if args.aug else None
        dump_pipeline(model, cfg, args.name, parse_size(args.pipeline), args.seed, args.out,
                      ratios, args.aug_flip)
    log(f"{args.name}: done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
