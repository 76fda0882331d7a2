"""Python API: load a checkpoint and predict on images.

    >>> import densediff
    >>> model = densediff.load("runs/demo/checkpoints/best.safetensors")
    >>> out = model.predict(image)          # PIL image, HxWx3 uint8 array, or a path
    >>> out.mask.shape, out.probs.shape     # (H, W) class ids, (K, H, W) probabilities
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

from densediff.config import Config, apply_overrides, config_from_dict
from densediff.data import class_info
from densediff.data.io import _to_uint8, read_image
from densediff.data.transforms import preprocess_image
from densediff.engine.checkpoint import load_into, load_weights
from densediff.engine.inference import predict_probs
from densediff.errors import UserError
from densediff.model import build_model

ImageLike = Union[str, Path, Image.Image, np.ndarray]


@dataclass
class Prediction:
    """Result of :meth:`Predictor.predict` for one image (all at the image's original size).

    Attributes:
        mask: ``(H, W)`` int64 class ids.
        probs: ``(K, H, W)`` float32 class probabilities.
        color: ``(H, W, 3)`` uint8 mask coloured with the dataset palette.
        overlay: ``(H, W, 3)`` uint8 image blended with ``color`` (alpha 0.5).
    """

    mask: np.ndarray
    probs: np.ndarray
    color: np.ndarray
    overlay: np.ndarray


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
    """A trained model with its config, ready to predict on new images.

    Args:
        model: the network (``predict_logits`` contract, see :mod:`densediff.model`).
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

    @torch.no_grad()
    def predict(self, image: ImageLike, aug: bool = False) -> Prediction:
        """Segment one image (PIL, HxW[x3|4] array, or path).

        Args:
            image: the input; grayscale/RGBA are converted to RGB.
            aug: multi-scale + flip test (scales from ``cfg.eval.aug``).
        """
        rgb = _as_uint8_rgb(image)
        x = preprocess_image(rgb, self.cfg).to(self.device)
        probs = predict_probs(self.model, x, self.cfg.eval, ori_size=rgb.shape[:2], aug=aug)[0]
        mask = probs.argmax(0).cpu().numpy().astype(np.int64)
        color = colorize(mask, self.palette, self.cfg.data.ignore_index)
        return Prediction(mask=mask, probs=probs.float().cpu().numpy(), color=color,
                          overlay=overlay(rgb, color))


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


def load(checkpoint: str | Path, device: str | torch.device = "cpu") -> Predictor:
    """Load a ``.safetensors`` checkpoint written by ``densediff train`` (config inside).

    Never unpickles: weights come from safetensors, the config from its JSON metadata.
    """
    dev = resolve_device(device)
    model, cfg, names, palette = load_model(checkpoint)
    return Predictor(model, cfg, names, palette, dev)
