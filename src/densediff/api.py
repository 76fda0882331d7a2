"""Python API: load a checkpoint and predict on images.

    >>> import densediff
    >>> model = densediff.load("runs/demo/checkpoints/best.safetensors")
    >>> out = model.predict(image)          # PIL image, HxWx3 uint8 array, or a path
    >>> out.mask.shape, out.probs.shape     # (H, W) class ids, (K, H, W) probabilities
    >>> out = model.predict(image, steps=5)  # DDP: any step count; out.uncertainty, out.trajectory
    >>> out.base_mask                        # DDPS: the frozen base segmentor's mask

Depth checkpoints give a :class:`DepthPrediction` (``out.depth`` in metres, ``out.color``,
``out.uncertainty``, ``out.trajectory``). BEV checkpoints take a multi-camera sample instead of
an image (samples from :meth:`Predictor.dataset`) and give a
:class:`BEVPrediction`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

from densediff.config import MAX_SEED, Config, apply_overrides
from densediff.data.io import as_uint8_rgb
from densediff.errors import UserError
from densediff.official import is_official_source, load_official
from densediff.pipelines import (
    BEVPrediction,
    DepthPrediction,
    Pipeline,
    Prediction,
    check_steps,
    is_diffusion,
    takes_starts,
)
from densediff.tasks import build_model, class_info, config_from_dict, spec_for
from densediff.utils.checkpoint import check_fits, load_into, load_weights, resolve_weights
from densediff.utils.checks import check_int
from densediff.utils.precision import autocast, resolve_precision
from densediff.viz import colorize, overlay

__all__ = ["BEVPrediction", "DepthPrediction", "Prediction", "Predictor", "check_steps",
           "colorize", "load", "load_model", "overlay", "resolve_device"]

ImageLike = Union[str, Path, Image.Image, np.ndarray]


class Predictor:
    """A trained model with its config, ready to predict on new images (segmentation masks,
    or depth maps for ``task: depth`` checkpoints).

    Args:
        model: the network (``predict_logits`` contract, see :mod:`densediff.models`).
        cfg: the resolved config stored in the checkpoint.
        class_names: names of the K classes.
        palette: ``(K, 3)`` uint8 colours.
        device: where to run.
        precision: ``fp32``, ``bf16`` (autocast; the sampling locations and the diffusion
            arithmetic stay fp32) or ``auto`` (bf16 where the hardware has it natively);
            see :mod:`densediff.utils.precision`.
    """

    def __init__(self, model: torch.nn.Module, cfg: Config, class_names: list[str],
                 palette: np.ndarray, device: str | torch.device = "cpu",
                 precision: str = "fp32"):
        self.model = model.to(device).eval()
        self.cfg = cfg
        self.class_names = class_names
        self.palette = palette
        self.device = torch.device(device)
        self.precision = resolve_precision_or_fail(precision, self.device)

    def compile(self) -> Predictor:
        """Compile the map decoder (``torch.compile``; DDP models) for the predictions that
        follow; returns ``self``. The first prediction then pays the compile time (about a
        minute for the paper's decoder on a 2-core CPU, ``benchmarks/RESULTS.md`` §14) and the
        later ones run faster, so it pays for many images of one size. A model without a map
        decoder is left as it is (a ``note:`` says so)."""
        import sys

        decoder = getattr(self.model, "decoder", None)
        if decoder is None or not isinstance(decoder, torch.nn.Module):
            print("note: compile: this model has no map decoder; running it uncompiled",
                  file=sys.stderr)
            return self
        self.model.decoder = torch.compile(decoder)
        return self

    @property
    def pipeline(self) -> Pipeline:
        """The task pipeline of this checkpoint (from :data:`densediff.tasks.TASKS`)."""
        return spec_for(self.cfg).pipeline

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def is_diffusion(self) -> bool:
        return is_diffusion(self.model)

    @property
    def takes_starts(self) -> bool:
        """Whether :meth:`predict` takes ``starts`` (random starts per input: DDP models)."""
        return takes_starts(self.model)

    @torch.no_grad()
    def predict(self, image: ImageLike | dict | list, aug: bool = False,
                steps: int | None = None, seed: int | Sequence[int] = 0,
                batch_size: int | None = None, starts: int | None = None):
        """Predict one input: an image (PIL, HxW[x3|4] array, or path) for segmentation
        (:class:`Prediction`) and depth (:class:`DepthPrediction`) models; a sample of the
        checkpoint's dataset (:meth:`dataset`: cameras, calibration[, points]) for BEV models
        (:class:`BEVPrediction`). A list (or tuple) of inputs gives a list of results.

        Args:
            image: the input image (grayscale/RGBA are converted to RGB), or the BEV sample;
                or a list of them.
            aug: multi-scale + flip test (scales from ``cfg.eval.aug``); depth: the flip test.
            steps: diffusion models: sampling steps (None: the model's default; DDPS: 0 gives
                the base segmentor's prediction).
            seed: diffusion models: seed of the starting noise (same seed, same result); with
                a list of inputs, one seed for all or one per input. The noise is drawn per
                input, so a result does not depend on the batch it ran in.
            starts: DDP models (:attr:`takes_starts`): random starts per input, 1 .. 100,
                whose outputs are averaged (None: the config's ``model.diffusion.randsteps``).
            batch_size: with a list: inputs per forward pass (default: all of them). Whole-
                image diffusion inference of same-size images, and BEV inference of samples
                with the same cameras, runs the encoder and the sampler on the batch, with
                results bit-identical to one input at a time
                (:func:`~densediff.utils.batching.batch_invariant`); other inference
                (sliding window, ``aug``) one at a time.
        """
        extra = {} if starts is None else {"starts": starts}  # a pipeline may not take it
        if not isinstance(image, (list, tuple)):
            check_int(seed, "seed", 0, MAX_SEED)
            with autocast(self.precision, self.device):
                return self.pipeline.predict(self, image, aug=aug, steps=steps, seed=seed,
                                             **extra)
        items = list(image)
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * len(items)
        if len(seeds) != len(items):
            raise UserError(f"seed: {len(seeds)} seeds for {len(items)} inputs (give one seed, "
                            "or one per input)")
        for s in seeds:
            check_int(s, "seed", 0, MAX_SEED)
        if batch_size is not None:
            check_int(batch_size, "batch_size", 1, 1 << 20)
        size = batch_size or max(len(items), 1)
        out: list = []
        with autocast(self.precision, self.device):
            for i in range(0, len(items), size):
                out += self.pipeline.predict_batch(self, items[i:i + size], aug=aug,
                                                   steps=steps, seeds=seeds[i:i + size],
                                                   **extra)
        return out

    def dataset(self, split: str = "val", data_root: str | None = None):
        """The checkpoint's dataset (test pipeline) for ``split`` (``val``/``test``/``train`` or
        a split name); ``data_root`` overrides ``data.root``. BEV samples come from here."""
        from densediff.tasks import build_dataset

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

    def trajectory_strip(self, pred: Prediction | DepthPrediction | BEVPrediction,
                         image: ImageLike | None = None) -> np.ndarray:
        """One unlabelled picture of a diffusion trajectory (H x W' x 3 uint8): [image,] [the
        DDPS base mask,] every step's mask / depth / map and the uncertainty, side by side
        (``pred.save(..., trajectory=True)`` writes the labelled picture)."""
        if image is not None and isinstance(pred, (Prediction, DepthPrediction)):
            pred = replace(pred, image=as_uint8_rgb(image))
        return pred.trajectory_strip()


def resolve_device(device: str | torch.device, key: str = "device") -> torch.device:
    """``device`` as a torch.device; UserError naming ``key`` (the CLI: ``--device``) when it
    is malformed or not available here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"{key} {str(device)!r}: not a device name (e.g. cpu, cuda, cuda:1)"
                        ) from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UserError(f"{key} {str(device)!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= n:
            raise UserError(f"{key} {str(device)!r}: only {n} CUDA device(s) here")
    return dev


def load_model(checkpoint: str | Path, overrides: list[str] | None = None
               ) -> tuple[torch.nn.Module, Config, list[str], np.ndarray]:
    """Rebuild the model stored in a checkpoint: ``(model on CPU, cfg, class names, palette)``.

    ``checkpoint``: a densediff ``.safetensors`` file, a run folder (its ``checkpoints/best``,
    else ``last``), or an official DDP checkpoint: a ``.pth`` file or ``hf://<repo>/<file>``
    (converted in memory, see :mod:`densediff.official`).
    ``overrides`` are dotted ``key=value`` changes to the stored config. The encoder's
    ``pretrained`` source is not read (every weight comes from the checkpoint), so a
    checkpoint also loads where the pretrained weights used for training are absent.
    """
    if is_official_source(checkpoint):
        model, cfg, _ = load_official(checkpoint)
        if overrides:
            cfg_dict, state = cfg.to_dict(), model.state_dict()
        else:
            names, palette = class_info(cfg)
            return model, cfg, names, palette
    else:
        if Path(checkpoint).is_dir():  # a run folder: its checkpoints/best, else last
            checkpoint = resolve_weights(checkpoint, "checkpoint")
        state, cfg_dict = load_weights(checkpoint)
    cfg = config_from_dict(apply_overrides(cfg_dict, list(overrides or [])),
                           source=str(checkpoint))
    names, palette = class_info(cfg)
    build_cfg = cfg.model_copy(deep=True)
    build_cfg.model.encoder.pretrained = None
    check_fits(lambda: build_model(build_cfg, len(names)), state, str(checkpoint))  # no memory
    model = build_model(build_cfg, len(names))
    load_into(model, state, source=str(checkpoint))
    return model, cfg, names, palette


def load(checkpoint: str | Path, device: str | torch.device = "cpu",
         overrides: list[str] | None = None, precision: str = "fp32") -> Predictor:
    """Load a checkpoint: a ``.safetensors`` file written by ``densediff train`` (config
    inside), a run folder, or an official DDP checkpoint (``.pth`` file or
    ``hf://yfji/DDP-Weight/<name>.pth``; see :func:`load_model`).

    Never executes anything from a file: weights come from safetensors (official ``.pth``:
    ``torch.load(weights_only=True)`` with plain numpy scalars only), the config from JSON.
    ``overrides``: dotted ``key=value`` changes to the stored config (e.g.
    ``model.ddps.guidance=0.4``). ``precision``: ``fp32``, ``bf16`` or ``auto`` (see
    :class:`Predictor`).
    """
    dev = resolve_device(device)
    resolve_precision_or_fail(precision, dev)
    model, cfg, names, palette = load_model(checkpoint, overrides)
    return Predictor(model, cfg, names, palette, dev, precision)


def resolve_precision_or_fail(precision: str, device: torch.device,
                              key: str = "precision") -> str:
    """:func:`~densediff.utils.precision.resolve_precision` with a UserError naming ``key``
    (checked before any work)."""
    try:
        return resolve_precision(precision, device, key)
    except ValueError as e:
        raise UserError(str(e)) from None
