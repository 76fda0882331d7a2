"""Python API: load a checkpoint and predict on images.

    >>> import densediff
    >>> model = densediff.load("runs/demo/checkpoints/best.safetensors")
    >>> out = model.predict(image)          # PIL image, HxWx3 uint8 array, or a path
    >>> out.mask.shape, out.probs.shape     # (H, W) class ids, (K, H, W) probabilities
    >>> out = model.predict(image, steps=5)  # DDP: any step count; out.uncertainty, out.trajectory
    >>> out.base_mask                        # DDPS: the frozen base segmentor's mask

Depth checkpoints give a :class:`DepthPrediction` (``out.depth`` in metres, ``out.color``,
``out.uncertainty``, ``out.trajectory``). BEV checkpoints take a multi-camera sample instead of
an image (:meth:`Predictor.predict_bev`; samples from :meth:`Predictor.dataset`) and give a
:class:`BEVPrediction`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from densediff.config import Config, apply_overrides, config_from_dict
from densediff.data import class_info
from densediff.data.io import _to_uint8, read_image
from densediff.data.transforms import preprocess_image
from densediff.engine.evaluate import depth_uncertainty_maps, is_diffusion, uncertainty_maps
from densediff.engine.inference import predict_depth, predict_probs
from densediff.errors import UserError
from densediff.models import build_model
from densediff.tasks.uncertainty import entropy_uncertainty
from densediff.utils.checkpoint import load_into, load_weights
from densediff.viz import depth_color, heatmap, scaled_heatmap

ImageLike = Union[str, Path, Image.Image, np.ndarray]


@dataclass
class Prediction:
    """Result of :meth:`Predictor.predict` for one image (all at the image's original size).

    Attributes:
        mask: ``(H, W)`` int64 class ids.
        probs: ``(K, H, W)`` float32 class probabilities.
        color: ``(H, W, 3)`` uint8 mask coloured with the dataset palette.
        overlay: ``(H, W, 3)`` uint8 image blended with ``color`` (alpha 0.5).
        steps: diffusion sampling steps used (None: a discriminative model).
        uncertainty: ``(H, W)`` float32 in [0, 1], diffusion models only: the paper's estimator,
            the share of steps at which the pixel's label changed (None when not available:
            discriminative models, sliding-window or multi-scale inference).
        entropy: ``(H, W)`` float32 in [0, 1]: normalised entropy of ``probs``.
        trajectory: ``(S, H, W)`` int64 label map of every sampling step (diffusion, whole-image
            inference), the last one being ``mask`` unless probabilities are accumulated.
        base_mask: ``(H, W)`` int64, DDPS with whole-image inference: the mask of the frozen
            base segmentor before refinement.
    """

    mask: np.ndarray
    probs: np.ndarray
    color: np.ndarray
    overlay: np.ndarray
    steps: int | None = None
    uncertainty: np.ndarray | None = None
    entropy: np.ndarray | None = None
    trajectory: np.ndarray | None = None
    base_mask: np.ndarray | None = None


@dataclass
class DepthPrediction:
    """Result of :meth:`Predictor.predict` for one image of a depth model (original size).

    Attributes:
        depth: ``(H, W)`` float32 depth in metres, clamped to [min_depth, max_depth].
        color: ``(H, W, 3)`` uint8 colourised depth (fixed scale, near is bright).
        steps: diffusion sampling steps used (None: a discriminative model).
        uncertainty: ``(H, W)`` float32 metres, diffusion models with whole-image inference
            and no flip test: the standard deviation of the depth over the sampling steps
            (and starts); None with one step and one start.
        uncertainty_starts: the same over the ``randsteps`` random starts of the last step
            (None unless ``model.diffusion.randsteps`` > 1).
        trajectory: ``(S, H, W)`` float32 depth of every sampling step.
    """

    depth: np.ndarray
    color: np.ndarray
    steps: int | None = None
    uncertainty: np.ndarray | None = None
    uncertainty_starts: np.ndarray | None = None
    trajectory: np.ndarray | None = None


@dataclass
class BEVPrediction:
    """Result of :meth:`Predictor.predict_bev` for one sample, on the output grid (``[ix, iy]``,
    x forward, y left; :func:`densediff.viz.bev_image` orients it for display).

    Attributes:
        probs: ``(K, X, Y)`` float32 per-class probabilities (multi-label).
        masks: ``(K, X, Y)`` bool, ``probs >= threshold``.
        color: ``(X, Y, 3)`` uint8 picture of ``masks`` (oriented: forward up, left left).
        steps: diffusion sampling steps used (None: a discriminative model).
        uncertainty: ``(K, X, Y)`` float32 in [0, 1], diffusion models: the share of steps at
            which the class mask changed.
        entropy: ``(K, X, Y)`` float32 in [0, 1]: normalised binary entropy of ``probs``.
        trajectory: ``(S, K, X, Y)`` bool masks of every step (diffusion models).
    """

    probs: np.ndarray
    masks: np.ndarray
    color: np.ndarray
    steps: int | None = None
    uncertainty: np.ndarray | None = None
    entropy: np.ndarray | None = None
    trajectory: np.ndarray | None = None

    def uncertainty_picture(self) -> np.ndarray | None:
        """X x Y x 3 uint8 heatmap of the classes' maximum step-change share, oriented as
        ``color``; None for a discriminative model."""
        from densediff.viz import bev_image

        return None if self.uncertainty is None else heatmap(bev_image(self.uncertainty.max(0)))


def colorize(mask: np.ndarray, palette: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Map class ids to RGB with ``palette`` (K x 3); ignore / out-of-range pixels are black."""
    out = np.zeros((*mask.shape, 3), np.uint8)
    valid = (mask >= 0) & (mask < len(palette)) & (mask != ignore_index)
    out[valid] = palette[mask[valid]]
    return out


def overlay(image: np.ndarray, color: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    return (image.astype(np.float32) * (1 - alpha) + color.astype(np.float32) * alpha).astype(np.uint8)


def _as_uint8_rgb(image: ImageLike) -> np.ndarray:
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"image array must be HxW, HxWx3 or HxWx4, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype == np.uint16:
        arr = _to_uint8(arr, "I;16")          # 16-bit: scaled like 16-bit files
    elif np.issubdtype(arr.dtype, np.floating):
        arr = _to_uint8(arr, "F")             # floats: [0, 1] or 0..255
    elif arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


class Predictor:
    """A trained model with its config, ready to predict on new images (segmentation masks,
    or depth maps for ``task: depth`` checkpoints).

    Args:
        model: the network (``predict_logits`` contract, see :mod:`densediff.models`).
        cfg: the resolved config stored in the checkpoint.
        class_names: names of the K classes.
        palette: ``(K, 3)`` uint8 colours.
        device: where to run.
    """

    def __init__(self, model: torch.nn.Module, cfg: Config, class_names: list[str],
                 palette: np.ndarray, device: str | torch.device = "cpu"):
        self.model = model.to(device).eval()
        self.cfg = cfg
        self.class_names = class_names
        self.palette = palette
        self.device = torch.device(device)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def is_diffusion(self) -> bool:
        return is_diffusion(self.model)

    @torch.no_grad()
    def predict(self, image: ImageLike, aug: bool = False, steps: int | None = None,
                seed: int = 0) -> Prediction | DepthPrediction:
        """Segment one image (PIL, HxW[x3|4] array, or path); a depth model gives a
        :class:`DepthPrediction`.

        Args:
            image: the input; grayscale/RGBA are converted to RGB.
            aug: multi-scale + flip test (scales from ``cfg.eval.aug``); depth: the flip test.
            steps: diffusion models: sampling steps (None: the model's default; DDPS: 0 gives
                the base segmentor's prediction).
            seed: diffusion models: seed of the starting noise (same seed, same result).
        """
        if self.cfg.task == "bev":
            raise UserError("predict: a BEV model takes multi-camera samples, not an image; use "
                            "predict_bev(sample) with samples from Predictor.dataset(split)")
        rgb = _as_uint8_rgb(image)
        x = preprocess_image(rgb, self.cfg).to(self.device)
        size = rgb.shape[:2]
        if self.cfg.task == "depth":
            return self._predict_depth(x, size, aug, steps, seed)
        extra: dict = {}
        if not self.is_diffusion:
            if steps is not None:
                raise UserError("steps: this checkpoint is not a diffusion model")
            probs = predict_probs(self.model, x, self.cfg.eval, ori_size=size, aug=aug)
        else:
            steps = self.model.default_steps if steps is None else int(steps)
            check_steps(self.model, [steps])
            extra["steps"] = steps
            if self.cfg.eval.mode == "whole" and not aug:
                feat = self.model.extract(x)
                probs, step_labels, maps = uncertainty_maps(self.model, feat, steps, size,
                                                            self.model.accumulation, [seed])
                extra["uncertainty"] = maps["steps"][0].cpu().numpy()
                extra["trajectory"] = step_labels[:, 0].cpu().numpy().astype(np.int64)
                base = getattr(feat, "logits", None)  # DDPS: the base segmentor's logits
                if base is not None:
                    base = F.interpolate(base, size=size, mode="bilinear", align_corners=False)
                    extra["base_mask"] = base[0].argmax(0).cpu().numpy().astype(np.int64)
            else:
                probs = predict_probs(self.model, x, self.cfg.eval, ori_size=size, aug=aug,
                                      steps=steps, seeds=[seed])
        probs = probs[0].float()
        mask = probs.argmax(0).cpu().numpy().astype(np.int64)
        color = colorize(mask, self.palette, self.cfg.data.ignore_index)
        return Prediction(mask=mask, probs=probs.cpu().numpy(), color=color,
                          overlay=overlay(rgb, color),
                          entropy=entropy_uncertainty(probs[None])[0].cpu().numpy(), **extra)

    def dataset(self, split: str = "val", data_root: str | None = None):
        """The checkpoint's dataset (test pipeline) for ``split`` (``val``/``test``/``train`` or
        a split name); ``data_root`` overrides ``data.root``. BEV samples come from here."""
        from densediff.data import build_dataset

        cfg = self.cfg.model_copy(deep=True)
        if data_root is not None:
            cfg.data.root = str(data_root)
        return build_dataset(cfg, getattr(cfg.data, f"{split}_split", split), train=False)

    def diagnose(self, split: str = "val", limit: int | None = 32,
                 steps: Sequence[int] = (1, 2, 3, 5, 10), data_root: str | None = None,
                 progress: bool = False) -> dict:
        """Whether the map decoder uses its noisy map (DDP models, every task): map reliance,
        single-call controls, the sampler's step curve against them and the fuse-weight sizes
        on the first ``limit`` samples of ``split``; see :func:`densediff.engine.diagnose.diagnose`
        (``format_diagnosis`` prints it)."""
        from densediff.engine.diagnose import diagnose, is_ddp

        if not is_ddp(self.model):
            raise UserError("diagnose: this checkpoint is not a DDP model (diagnostics read its "
                            "map decoder)")
        check_steps(self.model, list(steps))
        return diagnose(self.model, self.dataset(split, data_root), self.cfg, limit=limit,
                        steps=steps, progress=progress)

    @torch.no_grad()
    def predict_bev(self, sample: dict, steps: int | None = None, seed: int = 0,
                    threshold: float = 0.5) -> BEVPrediction:
        """The BEV map of one sample of :meth:`dataset` (its ``image`` dict: cameras,
        intrinsics, cam2ego[, points])."""
        from densediff.data import collate
        from densediff.data.datasets import to_device
        from densediff.engine.evaluate import bev_uncertainty_maps
        from densediff.viz import bev_color

        if self.cfg.task != "bev":
            raise UserError("predict_bev: this checkpoint is not a BEV model; use predict")
        inputs = to_device(collate([sample])["image"], self.device)
        extra: dict = {}
        if not self.is_diffusion:
            if steps is not None:
                raise UserError("steps: this checkpoint is not a diffusion model")
            probs = self.model.predict_probs(inputs)
        else:
            steps = self.model.default_steps if steps is None else int(steps)
            check_steps(self.model, [steps])
            probs, step_probs, maps = bev_uncertainty_maps(
                self.model, self.model.extract(inputs), steps, self.model.accumulation, [seed])
            extra = {"steps": steps, "uncertainty": maps["steps"][0].cpu().numpy(),
                     "trajectory": (step_probs[:, 0] >= threshold).cpu().numpy()}
        p = probs[0].float()
        masks = (p >= threshold).cpu().numpy()
        ent = entropy_uncertainty(torch.stack([p, 1 - p]), dim=0).cpu().numpy()
        return BEVPrediction(probs=p.cpu().numpy(), masks=masks,
                             color=bev_color(masks, self.palette), entropy=ent, **extra)

    def bev_panel(self, sample: dict, pred: BEVPrediction) -> np.ndarray:
        """One picture of a BEV prediction: the camera images (two rows of three) beside the
        predicted map, the ground truth and, for diffusion models, the uncertainty (the
        classes' maximum step-change share); maps forward up, left on the left."""
        from densediff.viz import bev_color, camera_mosaic

        mean = np.asarray(self.cfg.data.mean, np.float32)
        std = np.asarray(self.cfg.data.std, np.float32)
        cams = [np.clip(im.permute(1, 2, 0).numpy() * std + mean, 0, 255).astype(np.uint8)
                for im in sample["image"]["images"]]
        mosaic = camera_mosaic(cams)
        tiles = [pred.color, bev_color(sample["label"].numpy(), self.palette)]
        if pred.uncertainty is not None:
            tiles.append(pred.uncertainty_picture())
        size = mosaic.shape[0]
        tiles = [np.asarray(Image.fromarray(t).resize((size, size), Image.NEAREST)) for t in tiles]
        return side_by_side([mosaic, *tiles])

    def _predict_depth(self, x: torch.Tensor, size: tuple[int, int], aug: bool,
                       steps: int | None, seed: int) -> DepthPrediction:
        """:meth:`predict` for depth models (``aug``: the flip test)."""
        extra: dict = {}
        if not self.is_diffusion:
            if steps is not None:
                raise UserError("steps: this checkpoint is not a diffusion model")
            depth = predict_depth(self.model, x, size, flip=aug)
        else:
            steps = self.model.default_steps if steps is None else int(steps)
            check_steps(self.model, [steps])
            extra["steps"] = steps
            if aug:
                depth = predict_depth(self.model, x, size, flip=True, steps=steps, seeds=[seed])
            else:
                feat = self.model.extract(x)
                depth, step_depths, maps = depth_uncertainty_maps(
                    self.model, feat, steps, size, self.model.accumulation, [seed])
                extra["trajectory"] = step_depths[:, 0].cpu().numpy()
                for key, name in (("steps", "uncertainty"), ("starts", "uncertainty_starts")):
                    if key in maps:
                        extra[name] = maps[key][0].cpu().numpy()
        dd = self.cfg.data.depth
        d = depth[0].clamp(dd.min_depth, dd.max_depth).cpu().numpy().astype(np.float32)
        return DepthPrediction(depth=d, color=depth_color(d, dd.min_depth, dd.max_depth), **extra)

    def trajectory_strip(self, pred: Prediction | DepthPrediction | BEVPrediction,
                         image: ImageLike | None = None) -> np.ndarray:
        """One picture of a diffusion trajectory: [image,] [the DDPS base mask,] the colour mask
        (depth: the colourised depth; BEV: the map) of every step, and the uncertainty heatmap
        (depth: scaled to its maximum; BEV: the classes' maximum), side by side with a 4-pixel
        white gap (H x W' x 3 uint8)."""
        if pred.trajectory is None:
            raise UserError("no trajectory: it needs a diffusion model with whole-image inference")
        if isinstance(pred, BEVPrediction):
            from densediff.viz import bev_color

            return side_by_side([bev_color(m, self.palette) for m in pred.trajectory]
                                + [pred.uncertainty_picture()])
        if isinstance(pred, DepthPrediction):
            dd = self.cfg.data.depth
            tiles = [] if image is None else [_as_uint8_rgb(image)]
            tiles += [depth_color(d, dd.min_depth, dd.max_depth) for d in pred.trajectory]
            if pred.uncertainty is not None:
                tiles.append(scaled_heatmap(pred.uncertainty))
            return side_by_side(tiles)
        masks = ([] if pred.base_mask is None else [pred.base_mask]) + list(pred.trajectory)
        tiles = [] if image is None else [_as_uint8_rgb(image)]
        tiles += [colorize(m, self.palette, self.cfg.data.ignore_index) for m in masks]
        tiles.append(heatmap(pred.uncertainty))
        return side_by_side(tiles)

    def comparison(self, pred: Prediction, image: ImageLike) -> np.ndarray:
        """DDPS: image | base segmentor mask | refined mask, side by side (H x W' x 3 uint8)."""
        if pred.base_mask is None:
            raise UserError("no base mask: it needs a DDPS model with whole-image inference")
        return side_by_side([_as_uint8_rgb(image),
                             colorize(pred.base_mask, self.palette, self.cfg.data.ignore_index),
                             pred.color])


def side_by_side(tiles: list[np.ndarray], gap: int = 4) -> np.ndarray:
    """Equal-height H x W x 3 uint8 tiles joined left to right with white gaps."""
    white = np.full((tiles[0].shape[0], gap, 3), 255, np.uint8)
    parts = [p for t in tiles for p in (t, white)][:-1]
    return np.concatenate(parts, axis=1)


def check_steps(model: torch.nn.Module, steps: list[int], source: str = "model",
                key: str = "steps") -> None:
    """UserError unless every step count is within the model's ``min_steps`` .. ``max_steps``
    (DDPS: 0 .. its trained timesteps)."""
    from densediff.config import MAX_SAMPLING_STEPS

    lo, hi = model.min_steps, model.max_steps
    hi = MAX_SAMPLING_STEPS if hi is None else min(hi, MAX_SAMPLING_STEPS)
    bad = [n for n in steps if n < lo or n > hi]
    if bad:
        why = getattr(model, "max_steps_reason", "the trained timesteps")
        span = f"{lo}..{hi} ({why})" if model.max_steps is not None else f"{lo}..{hi}"
        raise UserError(f"{key}: {source} takes step counts {span}, got {bad[0]}")


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device; UserError when it is malformed or not available here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"device {str(device)!r}: not a device name (e.g. cpu, cuda, cuda:1)"
                        ) from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UserError(f"device {str(device)!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= n:
            raise UserError(f"device {str(device)!r}: only {n} CUDA device(s) here")
    return dev


def load_model(checkpoint: str | Path, overrides: list[str] | None = None
               ) -> tuple[torch.nn.Module, Config, list[str], np.ndarray]:
    """Rebuild the model stored in a checkpoint: ``(model on CPU, cfg, class names, palette)``.

    ``overrides`` are dotted ``key=value`` changes to the stored config. The encoder's
    ``pretrained`` source is not read (every weight comes from the checkpoint), so a
    checkpoint also loads where the pretrained weights used for training are absent.
    """
    state, cfg_dict = load_weights(checkpoint)
    cfg = config_from_dict(apply_overrides(cfg_dict, list(overrides or [])),
                           source=str(checkpoint))
    names, palette = class_info(cfg)
    build_cfg = cfg.model_copy(deep=True)
    build_cfg.model.encoder.pretrained = None
    model = build_model(build_cfg, len(names))
    load_into(model, state, source=str(checkpoint))
    return model, cfg, names, palette


def load(checkpoint: str | Path, device: str | torch.device = "cpu",
         overrides: list[str] | None = None) -> Predictor:
    """Load a ``.safetensors`` checkpoint written by ``densediff train`` (config inside).

    Never unpickles: weights come from safetensors, the config from its JSON metadata.
    ``overrides``: dotted ``key=value`` changes to the stored config (e.g.
    ``model.ddps.guidance=0.4``).
    """
    dev = resolve_device(device)
    model, cfg, names, palette = load_model(checkpoint, overrides)
    return Predictor(model, cfg, names, palette, dev)
