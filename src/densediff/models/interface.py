"""The one model interface every densediff model implements (:class:`DenseModel`), and the
:class:`Trajectory` every model's sampling returns.

A discriminative model is the one-call case of the same interface: it takes ``steps = 0`` only
and its trajectory holds its head's output as a single step. Pipelines, evaluation, ``bench``,
``diagnose`` and the onnxruntime model therefore use one code path for every model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["OUTPUT_KINDS", "DenseModel", "MapModel", "Trajectory", "is_diffusion"]

OUTPUT_KINDS = ("classes", "multilabel", "depth")
"""What a model's map holds: ``classes`` (one of K classes per pixel: logits), ``multilabel``
(K independent masks: logits, sigmoid), ``depth`` (one channel, metres)."""


@dataclass
class Trajectory:
    """Every sampling step of one call.

    Attributes:
        steps: ``steps[s]`` is step s's raw output, B x R x C x h x w (R noise starts per
            image; classes and multilabel: logits; depth: depth).
        kind: one of :data:`OUTPUT_KINDS`.
    """

    steps: list[torch.Tensor]
    kind: str = "classes"

    def __post_init__(self):
        if self.kind not in OUTPUT_KINDS:
            raise ValueError(f"Trajectory kind {self.kind!r}: expected one of {OUTPUT_KINDS}")

    def output(self, accumulation: bool) -> torch.Tensor:
        """B x C x h x w, the map the inference path resizes to the input size.

        ``accumulation``: the mean over every step and start of the step's activation
        (classes: softmax probabilities; multilabel: sigmoid; depth: the depth). Otherwise the
        last step averaged over starts: classes: its logits (mmseg's "seg logit": resized,
        then softmax), multilabel: its sigmoid, depth: its depth.
        """
        if accumulation:
            act = {"classes": lambda x: x.softmax(2), "multilabel": torch.sigmoid,
                   "depth": lambda x: x}[self.kind]
            # image by image: a mean over two dimensions sums in an order that depends on
            # the batch size, and an image's output must not depend on its batch
            return torch.cat([torch.stack([act(s[b:b + 1]) for s in self.steps]).mean((0, 2))
                              for b in range(len(self.steps[0]))])
        last = self.steps[-1]
        return (last.sigmoid() if self.kind == "multilabel" else last).mean(1)

    def step_outputs(self) -> torch.Tensor:
        """S x B x C x h x w: each step averaged over starts (classes: logits; multilabel:
        sigmoid probabilities; depth: depth)."""
        if self.kind == "multilabel":
            return torch.stack([s.sigmoid().mean(1) for s in self.steps])
        return torch.stack([s.mean(1) for s in self.steps])


@runtime_checkable
class DenseModel(Protocol):
    """What every model (and the onnxruntime model of :mod:`densediff.deploy`) provides for
    inference. Trainable models (:class:`MapModel`) add ``forward_train(inputs, label) ->
    losses`` (``loss``: their sum).

    Attributes:
        output_kind: one of :data:`OUTPUT_KINDS`.
        default_steps, min_steps, max_steps: the sampling steps taken by default and the
            bounds (``max_steps`` None: unbounded). Discriminative models: 0, 0, 0.
        accumulation: whether :meth:`Trajectory.output` averages over steps by default.
    """

    output_kind: str
    default_steps: int
    min_steps: int
    max_steps: int | None
    accumulation: bool

    def extract(self, inputs: Any) -> Any:
        """Run the encoder once: the features :meth:`sample_steps` takes."""

    def sample_steps(self, feat: Any, steps: int, *, seeds: Any = None,
                     **settings: Any) -> Trajectory:
        """``steps`` denoiser calls from the features (seeded per image); every step."""

    def predict_map(self, inputs: Any, steps: int | None = None, **settings: Any
                    ) -> torch.Tensor:
        """The output map B x C x H x W at the input size (BEV: the output grid)."""


def is_diffusion(model: DenseModel) -> bool:
    """True for models that sample (they take step counts other than 0)."""
    return model.max_steps != 0


class MapModel(nn.Module):
    """The part of :class:`DenseModel` every model shares: :meth:`predict_map` from
    :meth:`sample_steps`, and ``forward`` (what DistributedDataParallel calls). A subclass
    sets the attributes and implements ``extract``, ``sample_steps`` and ``forward_train``."""

    output_kind = "classes"
    default_steps = 0
    min_steps = 0
    max_steps: int | None = 0
    accumulation = False

    def set_iteration(self, iteration: int) -> None:
        """Called by the trainer before every optimizer step; a model whose training
        changes with the iteration (DDPS's two stages) overrides it."""

    def forward(self, inputs: Any, label: torch.Tensor | None = None):
        return self.forward_train(inputs, label) if label is not None else self.predict_map(inputs)

    def one_call(self, out: torch.Tensor, steps: int) -> Trajectory:
        """The trajectory of a discriminative model: its output ``out`` (B x C x h x w) as
        the one step of one start (``steps`` must be 0)."""
        if steps != 0:
            raise ValueError(f"a discriminative model takes steps = 0, got {steps}")
        return Trajectory([out[:, None]], self.output_kind)

    def resize_output(self, out: torch.Tensor, inputs: Any) -> torch.Tensor:
        """:meth:`Trajectory.output` at the input size (bilinear); BEV models keep the grid."""
        return F.interpolate(out, size=inputs.shape[-2:], mode="bilinear", align_corners=False)

    def predict_map(self, inputs: Any, steps: int | None = None,
                    accumulation: bool | None = None, **settings: Any) -> torch.Tensor:
        """B x C x H x W: :meth:`Trajectory.output` of ``steps`` steps (None: the default),
        resized to the input (:meth:`resize_output`). ``settings`` go to ``sample_steps``
        (e.g. ``seeds``, ``td``, ``randsteps``)."""
        traj = self.sample_steps(self.extract(inputs),
                                 self.default_steps if steps is None else steps, **settings)
        out = traj.output(self.accumulation if accumulation is None else accumulation)
        return self.resize_output(out, inputs)
