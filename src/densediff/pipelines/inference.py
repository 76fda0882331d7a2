"""Test-time inference: whole-image or sliding-window, optional multi-scale + flip.

Follows mmseg 0.x ``EncoderDecoder.inference`` / ``slide_inference`` / ``aug_test``: each pass
produces logits at the size of the image it was given, these are resized bilinearly to the
original size, turned into softmax probabilities (and flipped back for flipped passes), and
the probabilities of all passes are averaged.

The model only needs ``predict_map(img, **kwargs) -> B x K x h x w`` logits at its input
resolution; extra keyword arguments (e.g. the number of diffusion steps) are passed through.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from densediff.config import EvalConfig
from densediff.errors import ConfigError

__all__ = ["predict_depth", "predict_probs", "slide_logits"]


@torch.no_grad()
def predict_probs(model: nn.Module, img: torch.Tensor, eval_cfg: EvalConfig,
                   ori_size: tuple[int, int] | None = None, aug: bool = False,
                   scale_input: Callable[[float], torch.Tensor] | None = None,
                   **kwargs) -> torch.Tensor:
    """Class probabilities for a batch of images.

    Softmax probabilities (not logits), so that passes can be averaged; ``argmax(1)`` gives the
    label map.

    Args:
        model: a model (``predict_map(img, **kwargs)``); put it in eval mode first.
        img: B x 3 x H x W normalised images (already test-resized).
        eval_cfg: ``cfg.eval``: ``mode`` (whole | slide), ``crop_size``, ``stride``, ``aug``.
        ori_size: (h, w) of the output, normally the original image size; None: (H, W).
        aug: multi-scale + flip test: one pass per scale in ``eval_cfg.aug.scales`` (relative
            to ``img``: the image is resized bilinearly to ``round(H * s), round(W * s)``), each
            also on the horizontally flipped image when ``eval_cfg.aug.flip``. False: one pass.
            Give ``scale_input`` to build each pass from the original image as mmseg does.
        scale_input: ``ratio -> network input`` of that scale (e.g.
            :func:`densediff.data.transforms.aug_input` of the original image); used for
            every scale of ``aug`` instead of resizing ``img``.
        **kwargs: forwarded to ``model.predict_map``.

    Returns:
        B x K x h x w float32 probabilities (softmax over K, averaged over passes).
    """
    h, w = img.shape[-2:]
    out_size = tuple(ori_size) if ori_size is not None else (h, w)
    scales = eval_cfg.aug.scales if aug else [1.0]
    flips = [False, True] if aug and eval_cfg.aug.flip else [False]
    if not scales:
        raise ConfigError("eval.aug.scales: must not be empty")

    probs = None
    for s in scales:
        size = (max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5)))
        if aug and scale_input is not None:
            x = scale_input(s).to(img.device, img.dtype)
        else:
            x = img if size == (h, w) else F.interpolate(img, size=size, mode="bilinear",
                                                          align_corners=False)
        for flip in flips:
            xi = x.flip(-1) if flip else x
            logits = _single_pass(model, xi, eval_cfg, **kwargs)
            logits = logits.float()
            if tuple(logits.shape[-2:]) != out_size:
                logits = F.interpolate(logits, size=out_size, mode="bilinear",
                                       align_corners=False)
            p = logits.softmax(1)
            if flip:
                p = p.flip(-1)
            probs = p if probs is None else probs.add_(p)
    return probs / (len(scales) * len(flips))


def _single_pass(model: nn.Module, img: torch.Tensor, eval_cfg: EvalConfig,
                 **kwargs) -> torch.Tensor:
    """Logits at the size of ``img`` in the configured mode."""
    if eval_cfg.mode == "whole":
        return model.predict_map(img, **kwargs)
    if eval_cfg.mode == "slide":
        if eval_cfg.crop_size is None or eval_cfg.stride is None:
            raise ConfigError("eval.crop_size and eval.stride: both are required when "
                              "eval.mode is slide")
        return slide_logits(model, img, eval_cfg.crop_size, eval_cfg.stride, **kwargs)
    raise ConfigError(f"eval.mode: unknown mode {eval_cfg.mode!r}")


def slide_logits(model: nn.Module, img: torch.Tensor, crop_size: tuple[int, int],
                 stride: tuple[int, int], **kwargs) -> torch.Tensor:
    """Sliding-window logits (mmseg ``slide_inference``).

    Windows start every ``stride`` pixels; ``ceil((H - h_crop) / h_stride) + 1`` rows of
    windows (likewise columns), the last one shifted back to end at the image border. The
    logits of overlapping windows are averaged (sum / count).

    Unlike mmseg, an image smaller than the crop along a side is zero-padded (bottom/right)
    to the crop size, and the logits are cropped back, so the model always sees crop-sized
    inputs (fixed-size models, e.g. diffusion decoders, need that).

    Args:
        model: has ``predict_map(img, **kwargs)``.
        img: B x C x H x W.
        crop_size: window (h, w).
        stride: step (h, w), each at most the window size (else pixels would be skipped).

    Returns:
        B x K x H x W logits.
    """
    (hc, wc), (hs, ws) = crop_size, stride
    if not (0 < hs <= hc and 0 < ws <= wc):
        raise ConfigError(f"eval.stride: {tuple(stride)} must be positive and at most "
                          f"eval.crop_size {tuple(crop_size)}")
    h, w = img.shape[-2:]
    pad_h, pad_w = max(hc - h, 0), max(wc - w, 0)
    if pad_h or pad_w:
        img = F.pad(img, (0, pad_w, 0, pad_h))
    H, W = img.shape[-2:]
    h_grids = -(-(H - hc) // hs) + 1  # ceil division; H >= hc here
    w_grids = -(-(W - wc) // ws) + 1
    total = count = None
    for i in range(h_grids):
        for j in range(w_grids):
            y2, x2 = min(i * hs + hc, H), min(j * ws + wc, W)
            y1, x1 = y2 - hc, x2 - wc
            out = model.predict_map(img[:, :, y1:y2, x1:x2], **kwargs).float()
            if total is None:
                total = out.new_zeros(out.shape[0], out.shape[1], H, W)
                count = out.new_zeros(1, 1, H, W)
            total[:, :, y1:y2, x1:x2] += out
            count[:, :, y1:y2, x1:x2] += 1
    return (total / count)[:, :, :h, :w]


@torch.no_grad()
def predict_depth(model: nn.Module, img: torch.Tensor, ori_size: tuple[int, int] | None = None,
                  flip: bool = False, **kwargs) -> torch.Tensor:
    """Depth maps (B x H x W, metres) for a batch of images, resized bilinearly to ``ori_size``.

    ``flip``: the flip test of the depth toolboxes: the mean of the prediction and the
    flipped-back prediction for the horizontally flipped image. ``kwargs`` go to
    ``model.predict_map`` (e.g. ``steps``, ``seeds``: the flipped pass uses the same noise).
    """
    out_size = tuple(ori_size) if ori_size is not None else tuple(img.shape[-2:])
    passes = [False, True] if flip else [False]
    total = None
    for f in passes:
        d = model.predict_map(img.flip(-1) if f else img, **kwargs).float()
        d = d.flip(-1) if f else d
        if tuple(d.shape[-2:]) != out_size:
            d = F.interpolate(d, size=out_size, mode="bilinear", align_corners=False)
        total = d if total is None else total + d
    return (total / len(passes))[:, 0]
