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

import numpy as np
import torch
from torch import nn

from densediff.config import MAX_SAMPLING_STEPS, MAX_STARTS, Config
from densediff.data.io import as_uint8_rgb
from densediff.data.transforms import preprocess_image
from densediff.errors import UserError
from densediff.models.interface import is_diffusion as model_is_diffusion
from densediff.utils import distributed as du

__all__ = ["Evaluator", "Pipeline", "StepViews", "batch_groups", "check_starts", "check_steps",
           "default_starts", "is_diffusion", "resolve_steps", "sample_seed", "takes_starts", "write_files"]


def is_diffusion(model: nn.Module) -> bool:
    """True for models that sample (they take step counts other than 0); a
    DistributedDataParallel wrapper is unwrapped."""
    return model_is_diffusion(du.unwrap(model))


def takes_starts(model: nn.Module) -> bool:
    """True for models that sample from several random starts per input (DDP's ``randsteps``:
    the DDP family, segmentation, depth and BEV, and their onnxruntime twin)."""
    from densediff.models.ddp import MapSampling

    return isinstance(du.unwrap(model), MapSampling)


def default_starts(model: nn.Module) -> int:
    """The random starts per input a model samples by default (its ``randsteps``; 1 for
    models without random starts)."""
    return du.unwrap(model).diffusion_cfg.randsteps if takes_starts(model) else 1


def check_starts(model: nn.Module, starts: int | None, key: str = "starts") -> dict:
    """The sampler settings of ``starts`` random starts per input (None: the model's own
    ``randsteps``): ``{}`` or ``{"randsteps": starts}``; UserError naming ``key`` when the model
    has no random starts or ``starts`` is outside 1 .. :data:`MAX_STARTS`."""
    if starts is None:
        return {}
    if not takes_starts(model):
        raise UserError(f"{key}: this checkpoint has no random starts (they apply to DDP models)")
    from densediff.utils.checks import check_int

    check_int(starts, key, 1, MAX_STARTS)
    return {"randsteps": int(starts)}


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
    over = [n for n in steps if n > MAX_SAMPLING_STEPS]
    if over:
        raise UserError(f"{key}: {over[0]} steps is above the limit of {MAX_SAMPLING_STEPS} "
                        "(DDIM gains nothing past a few dozen steps; each step is one decoder "
                        "pass)")
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


class StepViews:
    """What the result types share for the pictures of a trajectory (``trajectory``: one
    map per sampling step, or None)."""

    @property
    def num_steps(self) -> int:
        """Pictures of the trajectory: ``step_view`` takes 1 .. this (0: none)."""
        return 0 if self.trajectory is None else len(self.trajectory)

    def step_count(self, step: int) -> int:
        """:attr:`num_steps`; UserError unless ``step`` is within 1 .. it."""
        n = self.num_steps
        if not 1 <= step <= n:
            raise UserError(f"step: must be between 1 and {n}, got {step}")
        return n


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

    def image_outputs(self, model: nn.Module, cfg: Config, feat, img, size: tuple[int, int],
                      steps: int, seeds: list[int], aug: bool, scale_input=None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One input's prediction at ``size`` (the label's) with ``steps`` steps, and its
        uncertainty maps by kind (``feat``: the shared encoder output, or None;
        ``scale_input``: see :meth:`aug_inputs`)."""
        raise NotImplementedError

    def update_metrics(self, metric, unc: dict, pred: torch.Tensor,
                       maps: dict[str, torch.Tensor], label: torch.Tensor, dataset) -> None:
        """Add one prediction of :meth:`image_outputs` to ``metric`` and its maps to the
        uncertainty metrics ``unc`` (by kind)."""
        raise NotImplementedError

    def evaluator(self, model: nn.Module, dataset, cfg: Config, steps: list[int], aug: bool,
                  device: torch.device) -> Evaluator:
        """The :class:`Evaluator` of this task's metrics at each step count."""
        return Evaluator(self, model, dataset, cfg, steps, aug, device)

    def aug_inputs(self, dataset, index: int, cfg: Config):
        """``ratio -> network input`` for the test-time augmentation of dataset item
        ``index``, built from the original image; None: the passes resize the test input."""
        return None

    def score_trajectory(self, model: nn.Module, metric, traj, label: torch.Tensor) -> None:
        """Update ``metric`` with a model trajectory's output (diagnostics)."""
        raise NotImplementedError

    def format_metrics(self, metrics: dict, class_names: Sequence[str]) -> str:
        raise NotImplementedError

    plot_keys: tuple[str, ...] = ()
    """The metrics ``eval --plot`` and the demo draw against the step count (empty: the
    task's headline metric)."""
    plot_ylabel: str = "%"

    def steps_table(self, results: dict) -> str:
        """Plain-text table of per-step-count results (one row per step count)."""
        from densediff.viz import scalar_steps_table

        return scalar_steps_table(results)

    # -- prediction ------------------------------------------------------------------------
    def predict(self, predictor, item, *, aug: bool = False, steps: int | None = None,
                seed: int = 0, starts: int | None = None):
        """One input through ``predictor``'s model: the task's result type (with ``.save``,
        the pictures ``input_view`` / ``prediction_view`` / ``uncertainty_view`` /
        ``step_view`` and ``summary``). ``item``: an image (path, PIL image or array) when
        :attr:`image_input`, else a sample of the checkpoint's dataset; ``starts``: random
        starts (:func:`check_starts`; None: the model's own)."""
        raise NotImplementedError

    def predict_batch(self, predictor, items: Sequence, *, aug: bool = False,
                      steps: int | None = None, seeds: Sequence[int], **extra) -> list:
        """Several inputs through ``predictor``'s model, ``seeds[i]`` the noise seed of
        ``items[i]``: the same results as :meth:`predict` one at a time (the noise is drawn
        per image). This default predicts one at a time; image tasks override it to run the
        encoder and the sampler on whole batches (:func:`batch_groups`)."""
        return [self.predict(predictor, it, aug=aug, steps=steps, seed=s, **extra)
                for it, s in zip(items, seeds)]

    def image_tensor(self, predictor, item) -> tuple[np.ndarray, torch.Tensor]:
        """``(uint8 RGB image, the model's input tensor)`` of an image ``item``; UserError when
        ``item`` is a dataset sample."""
        if isinstance(item, dict):
            raise UserError(f"predict: a {self.name} model takes an image (path, PIL image or "
                            "array), not a dataset sample")
        rgb = as_uint8_rgb(item)
        return rgb, preprocess_image(rgb, predictor.cfg).to(predictor.device)

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
        self.check_aug(aug, source)

    def check_aug(self, aug: bool, source: str, key: str = "--aug-test") -> None:
        """UserError naming ``key`` when ``aug`` asks for test-time augmentation this task
        does not have (``source`` names the model)."""
        if aug and not self.has_aug:
            raise UserError(f"{key}: {source} is a {self.name} model; {self.name} "
                            "models have no test-time augmentation")

    # -- bench / info ----------------------------------------------------------------------
    def example_input(self, cfg: Config, size: tuple[int, int] | None, batch: int,
                      device: torch.device) -> tuple[Any, tuple[int, int]]:
        """A random model input of ``batch`` samples and its (H, W) image size."""
        h, w = size if size else (cfg.data.train_pipeline.crop_size or (512, 512))
        return torch.randn(batch, 3, int(h), int(w), device=device), (int(h), int(w))


def batch_groups(inputs: Sequence[tuple[np.ndarray, torch.Tensor]]) -> list[list[int]]:
    """Indices of ``(image, input tensor)`` pairs that can share one batch: same original
    size and same input size (in order of first appearance)."""
    groups: dict[tuple, list[int]] = {}
    for i, (rgb, x) in enumerate(inputs):
        groups.setdefault((rgb.shape[:2], tuple(x.shape)), []).append(i)
    return list(groups.values())


class Evaluator:
    """A task's metrics at several step counts, as ``reset`` / ``process`` / ``result``
    (detectron2's ``DatasetEvaluator`` shape): :meth:`process` takes one input at a time;
    :meth:`result` reduces over processes and computes.

    Whole-image diffusion inference without test-time augmentation runs the encoder once per
    input and samples every step count from its features (:meth:`Pipeline.shares_encoder`).
    """

    def __init__(self, pipe: Pipeline, model: nn.Module, dataset, cfg: Config,
                 steps: list[int], aug: bool, device: torch.device):
        self.pipe, self.model, self.dataset, self.cfg = pipe, model, dataset, cfg
        self.steps, self.aug, self.device = list(steps), aug, device
        self.shared = pipe.shares_encoder(model, cfg, aug)
        self.reset()

    def reset(self) -> None:
        """Fresh metrics for every step count."""
        pipe, model, cfg, dev = self.pipe, self.model, self.cfg, self.device
        self.metrics = {n: pipe.metric(self.dataset, cfg, dev) for n in self.steps}
        self.unc = {n: pipe.uncertainty_metrics(model, cfg, n, self.shared, dev)
                    for n in self.steps}

    def process(self, index: int, img, label: torch.Tensor) -> None:
        """Score dataset item ``index`` (its test input and its label at the original size)
        at every step count, with the item's own noise seed."""
        feat = self.model.extract(img) if self.shared else None
        scale_input = self.pipe.aug_inputs(self.dataset, index, self.cfg) if self.aug else None
        seeds = [sample_seed(self.cfg, index)]
        size = tuple(label.shape[-2:])
        for n in self.steps:
            pred, maps = self.pipe.image_outputs(self.model, self.cfg, feat, img, size, n, seeds,
                                                 self.aug, scale_input)
            self.pipe.update_metrics(self.metrics[n], self.unc[n], pred, maps, label,
                                     self.dataset)

    def result(self) -> dict[int, dict]:
        """Step count -> the task's metrics (the full-set values on every process), with
        ``uncertainty`` ``{kind: scores}`` where uncertainty maps were scored."""
        results = {}
        for n in self.steps:
            self.metrics[n].reduce()
            results[n] = self.metrics[n].compute()
            if is_diffusion(self.model) or self.unc[n]:  # a segmentor: its softmax entropy
                for m in self.unc[n].values():
                    m.reduce()
                results[n]["uncertainty"] = {k: m.compute() for k, m in self.unc[n].items()}
        return results
