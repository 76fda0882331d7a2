"""What every task pipeline shares: the step-count rules, the per-image noise seed and the
interface a task module implements (:class:`Pipeline`).

A pipeline is the one home of a task (:mod:`~densediff.pipelines.segmentation`,
:mod:`~densediff.pipelines.depth`, :mod:`~densediff.pipelines.bev`): how a model's outputs
are formed from its trajectory (outputs), how one image updates the task's metrics
(scoring), its result type with ``.save(out_dir, stem)`` (the files ``predict`` writes), and
its pictures (drawn by :mod:`densediff.viz`). The CLI, the demo, evaluation, ``bench`` and
``info`` find it through :data:`densediff.pipelines.PIPELINES` (keyed by ``cfg.task``)
instead of branching on the task.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from densediff.config import MAX_SAMPLING_STEPS, Config
from densediff.errors import UserError
from densediff.models.interface import is_diffusion as model_is_diffusion
from densediff.utils import distributed as du

__all__ = ["Pipeline", "check_steps", "is_diffusion", "resolve_steps", "sample_seed",
           "write_files"]


def is_diffusion(model: nn.Module) -> bool:
    """True for models that sample (they take step counts other than 0); a
    DistributedDataParallel wrapper is unwrapped."""
    return model_is_diffusion(du.unwrap(model))


def sample_seed(cfg: Config, index: int) -> int:
    """The noise seed of dataset item ``index``: results do not depend on batching, the
    number of processes or the order of evaluation."""
    return cfg.seed * 1_000_003 + index


def check_steps(model: nn.Module, steps: Sequence[int], source: str = "model",
                key: str = "steps") -> None:
    """UserError unless every step count is within the model's ``min_steps`` .. ``max_steps``
    (capped at ``MAX_SAMPLING_STEPS``; DDPS: 0 .. its trained timesteps). The one place step
    counts are checked against a model."""
    model = du.unwrap(model)
    lo, hi = model.min_steps, model.max_steps
    top = MAX_SAMPLING_STEPS if hi is None else min(hi, MAX_SAMPLING_STEPS)
    bad = [n for n in steps if n < lo or n > top]
    if bad:
        why = getattr(model, "max_steps_reason", "the trained timesteps")
        span = f"{lo}..{top} ({why})" if hi is not None else f"{lo}..{top}"
        raise UserError(f"{key}: {source} takes step counts {span}, got {bad[0]}")


def resolve_steps(model: nn.Module, steps: int | Sequence[int] | None, source: str = "model",
                  key: str = "steps") -> list[int]:
    """The step counts to run, resolved and checked in one place: ``[0]`` for a
    discriminative model (``steps`` must be None: UserError otherwise), else ``steps`` (an
    int or a sequence; None: the model's ``default_steps``), deduplicated in order and
    checked by :func:`check_steps`."""
    model = du.unwrap(model)
    if not is_diffusion(model):
        if steps is not None:
            raise UserError(f"{key}: {source} is not a diffusion model")
        return [0]
    if steps is None:
        steps = [model.default_steps]
    elif isinstance(steps, numbers.Integral):  # one int (numpy integers too)
        steps = [steps]
    steps = list(dict.fromkeys(int(s) for s in steps))
    check_steps(model, steps, source, key)
    return steps


def write_files(out_dir, stem: str, files: dict) -> list[str]:
    """Write ``{suffix: content}`` as ``out_dir/<stem>_<suffix>``, in order, making
    ``out_dir``; returns the suffixes. Content: an array (``.npy``: saved as is, else a PNG of
    the uint8 / uint16 array) or a function drawing the file at the path it is given (the
    labelled pictures)."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from densediff.utils.fs import atomic_write

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for kind, content in files.items():
        path = out / f"{stem}_{kind}"
        if callable(content):
            write = content
        elif kind.endswith(".npy"):
            def write(tmp, a=content):
                with open(tmp, "wb") as f:
                    np.save(f, a)
        else:
            def write(tmp, a=content):
                Image.fromarray(a).save(tmp, format="PNG")
        # each file whole or not at all; a failed write (full disk, ulimit -f): one line
        atomic_write(path, write, what="predict")
    return list(files)


class Pipeline:
    """The interface of a task module (one instance per task in
    :data:`densediff.pipelines.PIPELINES`).

    Attributes:
        name: how messages name the task's models (e.g. ``BEV``).
        has_aug: whether test-time augmentation exists (``--aug-test``).
        aug_name: what that augmentation is, for messages.
        image_input: True when ``predict`` takes images (files); False when it takes samples
            of the checkpoint's dataset (BEV: calibrated cameras).
    """

    name: str = ""
    has_aug: bool = True
    aug_name: str = "multi-scale+flip"
    image_input: bool = True

    # -- scoring ---------------------------------------------------------------------------
    def shares_encoder(self, model: nn.Module, cfg: Config, aug: bool) -> bool:
        """Whether evaluation runs the encoder once per image and samples every step count
        from its features (then the step-change uncertainty exists): diffusion models with
        whole-image inference and no test-time augmentation."""
        return is_diffusion(model) and cfg.eval.mode == "whole" and not aug

    def metric(self, dataset, cfg: Config, device: torch.device, boundary: bool = True):
        """A fresh metric of the task (torchmetrics-style ``update``/``compute``)."""
        raise NotImplementedError

    def uncertainty_metrics(self, model: nn.Module, cfg: Config, steps: int, shared: bool,
                            device: torch.device) -> dict[str, Any]:
        """The uncertainty-map metrics one step count fills (may be empty)."""
        raise NotImplementedError

    def score_image(self, model: nn.Module, cfg: Config, dataset, feat, img, label,
                    steps: list[int], seeds: list[int], aug: bool, metrics: dict,
                    unc: dict, scale_input=None) -> None:
        """Update ``metrics[n]`` and ``unc[n][kind]`` with one image for each step count
        ``n`` (``feat``: the shared encoder output, or None; ``scale_input``: see
        :meth:`aug_inputs`)."""
        raise NotImplementedError

    def aug_inputs(self, dataset, index: int, cfg: Config):
        """``ratio -> network input`` for the test-time augmentation of dataset item
        ``index``, built from the original image; None: the passes resize the test input."""
        return None

    def score_trajectory(self, model: nn.Module, metric, traj, label: torch.Tensor) -> None:
        """Update ``metric`` with a model trajectory's output (diagnostics)."""
        raise NotImplementedError

    def format_metrics(self, metrics: dict, class_names: Sequence[str]) -> str:
        raise NotImplementedError

    # -- prediction ------------------------------------------------------------------------
    def output_names(self, predictor, uncertainty: bool, trajectory: bool,
                     save_probs: bool) -> list[str]:
        """The file name suffixes ``predict`` may write per input (``<stem>_<suffix>``), to
        check before any work that no input is overwritten."""
        raise NotImplementedError

    def check_predict_options(self, source: str, predictor, *, save_probs: bool,
                              uncertainty: bool, aug: bool, onnx: bool) -> None:
        """UserError (one line, naming the option) for ``predict`` options this task's
        models do not take; ``source`` names the checkpoint."""
        if save_probs:
            raise UserError(f"--save-probs: applies to segmentation models; {source} is a "
                            f"{self.name} model")
        if aug and not self.has_aug:
            raise UserError(f"--aug-test: {source} is a {self.name} model; {self.name} "
                            "models have no test-time augmentation")

    # -- bench / info ----------------------------------------------------------------------
    def example_input(self, cfg: Config, size: tuple[int, int] | None, batch: int,
                      device: torch.device) -> tuple[Any, tuple[int, int]]:
        """A random model input of ``batch`` samples and its (H, W) image size."""
        h, w = size if size else (cfg.data.train_pipeline.crop_size or (512, 512))
        return torch.randn(batch, 3, int(h), int(w), device=device), (int(h), int(w))
