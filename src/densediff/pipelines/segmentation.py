"""Semantic segmentation, end to end: a model's outputs from its trajectory, one image's
metric update, :class:`Prediction` with the files ``predict`` writes, and its pictures."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from densediff.config import Config
from densediff.criteria.segmentation import SegMetric, class_ids, format_metrics
from densediff.criteria.uncertainty import (
    UncertaintyMetric,
    entropy_uncertainty,
    step_change_uncertainty,
)
from densediff.data.transforms import aug_input
from densediff.errors import UserError
from densediff.pipelines.base import (
    Pipeline,
    StepViews,
    batch_groups,
    check_starts,
    is_diffusion,
    resolve_steps,
    write_files,
)
from densediff.pipelines.inference import predict_probs
from densediff.utils.batching import batch_invariant

__all__ = ["Prediction", "SegmentationPipeline", "uncertainty_maps"]


@torch.no_grad()
def uncertainty_maps(model: nn.Module, feat: torch.Tensor, steps: int, out_size: tuple[int, int],
                     accumulation: bool, seeds: Sequence[int] | None = None,
                     in_size: tuple[int, int] | None = None, **settings
                     ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Sample ``steps`` steps from features and form the outputs at ``out_size``.

    ``in_size``: the size of the network input; maps are resized bilinearly to it first and
    then to ``out_size``, as mmseg's whole-image inference does (two resizes differ from one).
    ``settings`` go to ``sample_steps`` (e.g. ``randsteps``).

    Returns:
        ``(probs B x K x H x W, step_labels S x B x H x W, {"steps": ..., "entropy": ...})``:
        the output probabilities, every step's label map, and the two uncertainty maps
        (B x H x W in [0, 1]): the paper's count of step-to-step label changes (DDP §3.4), and
        the normalised entropy of the output probabilities.
    """
    traj = model.sample_steps(feat, steps, seeds=seeds, **settings)

    def up(x: torch.Tensor) -> torch.Tensor:
        for size in ([] if in_size is None else [tuple(in_size)]) + [tuple(out_size)]:
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x

    # accumulated: the mean step probabilities, upsampled (a distribution already); else the
    # softmax of the upsampled logits
    probs = up(traj.output(True)) if accumulation else up(traj.output(False)).softmax(1)
    step_labels = torch.stack([class_ids(up(lg)) for lg in traj.step_outputs()])
    unc = {"steps": step_change_uncertainty(step_labels), "entropy": entropy_uncertainty(probs)}
    return probs, step_labels, unc


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


@dataclass
class Prediction(StepViews):
    """Result of :meth:`~densediff.api.Predictor.predict` for one image (all at the image's
    original size).

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
        image, class_names, palette, ignore_index: the input and the dataset's classes (for
            the pictures).
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
    image: np.ndarray | None = field(default=None, repr=False)
    class_names: list[str] = field(default_factory=list, repr=False)
    palette: np.ndarray | None = field(default=None, repr=False)
    ignore_index: int = field(default=255, repr=False)

    def video_frame(self) -> np.ndarray:
        """This result as one frame of a predicted video (``predict`` on a video): the
        overlay (H x W x 3 uint8)."""
        return self.overlay

    def colorize(self, mask: np.ndarray) -> np.ndarray:
        from densediff.viz import colorize

        return colorize(mask, self.palette, self.ignore_index)

    def trajectory_strip(self) -> np.ndarray:
        """[image,] [the DDPS base mask,] the colour mask of every step and the uncertainty
        heatmap side by side (H x W' x 3 uint8, no labels; :meth:`save` writes the labelled
        picture)."""
        from densediff.errors import UserError
        from densediff.viz import heatmap, side_by_side

        if self.trajectory is None:
            raise UserError("no trajectory: it needs a diffusion model with whole-image inference")
        masks = ([] if self.base_mask is None else [self.base_mask]) + list(self.trajectory)
        tiles = [] if self.image is None else [self.image]
        return side_by_side(tiles + [self.colorize(m) for m in masks] + [heatmap(self.uncertainty)])

    def save_trajectory(self, path: str | Path):
        """The labelled trajectory picture: image | [base] | step 1 .. S | uncertainty, with
        column titles, the class legend and the uncertainty colour bar."""
        from densediff.errors import UserError
        from densediff.viz import ColorScale, GridColumn, save_labelled_grid

        if self.trajectory is None:
            raise UserError("--trajectory: needs whole-image inference without --aug-test")
        tiles, cols = [], []
        if self.image is not None:
            tiles.append(self.image)
            cols.append(GridColumn("image"))
        if self.base_mask is not None:
            tiles.append(self.colorize(self.base_mask))
            cols.append(GridColumn("base segmentor (step 0)"))
        n = len(self.trajectory)
        for s, m in enumerate(self.trajectory, 1):
            tiles.append(self.colorize(m))
            cols.append(GridColumn(f"step {s} of {n}"))
        tiles.append(ColorScale("inferno", 0, 1, "").colorize(self.uncertainty))
        cols.append(GridColumn("uncertainty", ColorScale(
            "inferno", 0, 1, "share of step-to-step transitions at which the label changed")))
        return save_labelled_grid([tiles], cols, path, legend=self._legend(),
                                  legend_title="classes",
                           title=f"Sampling trajectory ({n} steps)")

    def save_comparison(self, path: str | Path):
        """DDPS: image | base segmentor mask | refined mask, labelled."""
        from densediff.viz import GridColumn, save_labelled_grid

        tiles = [self.image, self.colorize(self.base_mask), self.color]
        cols = [GridColumn("image"), GridColumn("base segmentor"),
                GridColumn(f"refined by DDPS ({self.steps} steps)")]
        return save_labelled_grid([tiles], cols, path, legend=self._legend(), legend_title="classes")

    # -- the pictures of the web page (densediff.app) and the summary -----------------------
    def input_view(self):
        """The input image (:class:`~densediff.viz.Picture`)."""
        from densediff.viz import Picture

        return Picture("image", self.image)

    def prediction_view(self):
        """The mask over the image with the class legend."""
        from densediff.viz import Picture

        what = "mask" if self.steps is None else f"mask after {self.steps} steps"
        return Picture(f"{what}, over the image", self.overlay, legend=tuple(self._legend()))

    def uncertainty_view(self):
        """The step-change uncertainty (diffusion models with whole-image inference), else
        the normalised entropy of the probabilities, with its colour bar."""
        from densediff.viz import ColorScale, Picture

        if self.uncertainty is not None:
            scale = ColorScale("inferno", 0, 1, "share of step-to-step transitions at which "
                               "the label changed")
            return Picture("uncertainty", scale.colorize(self.uncertainty), scale)
        scale = ColorScale("inferno", 0, 1, "normalised entropy of the class probabilities")
        return Picture("uncertainty (entropy)", scale.colorize(self.entropy), scale)


    def step_view(self, step: int):
        """Step ``step`` (1 .. :attr:`num_steps`) of the trajectory: its mask, with the legend."""
        from densediff.viz import Picture

        n = self.step_count(step)
        return Picture(f"step {step} of {n}", self.colorize(self.trajectory[step - 1]),
                       legend=tuple(self._legend()))

    def summary(self) -> dict:
        """What the prediction holds, JSON-ready: size, steps, the share of pixels of each
        predicted class, the mean uncertainty."""
        h, w = self.mask.shape
        ids, counts = np.unique(self.mask, return_counts=True)
        names = list(self.class_names)
        out = {"task": "segmentation", "height": int(h), "width": int(w), "steps": self.steps,
               "classes": {names[i] if 0 <= i < len(names) else str(int(i)):
                           round(float(c) / (h * w), 6) for i, c in zip(ids, counts)},
               "mean_entropy": round(float(self.entropy.mean()), 6)}
        if self.uncertainty is not None:
            out["mean_uncertainty"] = round(float(self.uncertainty.mean()), 6)
        if self.base_mask is not None:
            out["changed_from_base"] = round(float((self.base_mask != self.mask).mean()), 6)
        return out

    LEGEND_ALL_UP_TO = 20
    """Legends list every class up to this many classes; above (ADE20K: 150), only the classes
    present in the pictured masks, so the legend stays readable."""

    def _legend(self) -> list:
        entries = list(zip(self.class_names, np.asarray(self.palette).tolist()))
        if len(entries) <= self.LEGEND_ALL_UP_TO:
            return entries
        shown = [self.mask] + ([] if self.trajectory is None else list(self.trajectory)) + (
            [] if self.base_mask is None else [self.base_mask])
        present = set(np.unique(np.concatenate([m.ravel() for m in shown])).tolist())
        return [e for k, e in enumerate(entries) if k in present]

    def save(self, out_dir: str | Path, stem: str, uncertainty: bool = False,
             trajectory: bool = False, save_probs: bool = False,
             note: Callable[[str], None] = _note) -> list[str]:
        """Write ``<stem>_{mask,color,overlay}.png`` (mask: class ids as 8-bit PNG); with
        ``uncertainty`` the entropy and step-change heatmaps; with ``trajectory`` the labelled
        trajectory picture; DDPS: the base mask and the comparison; with ``save_probs``
        ``<stem>_probs.npy`` (K x H x W float16). Returns the suffixes written."""
        from densediff.viz import heatmap

        pictures = {"mask": self.mask.astype(np.uint8), "color": self.color,
                    "overlay": self.overlay}
        if uncertainty:
            pictures["entropy"] = heatmap(self.entropy)
            if self.uncertainty is not None:
                pictures["uncertainty"] = heatmap(self.uncertainty)
            elif self.steps is not None:
                note(f"{stem}: no step-change uncertainty with sliding-window or multi-scale "
                     "inference; wrote the entropy map only")
        if self.base_mask is not None:
            pictures["base"] = self.colorize(self.base_mask)
        files: dict = {f"{k}.png": v for k, v in pictures.items()}
        if self.base_mask is not None and self.image is not None:
            files["compare.png"] = self.save_comparison
        if trajectory:
            files["trajectory.png"] = self.save_trajectory
        if save_probs:
            files["probs.npy"] = self.probs.astype(np.float16)
        return write_files(out_dir, stem, files)


class SegmentationPipeline(Pipeline):
    """``task: segmentation``."""

    name = "segmentation"

    def check_predict_options(self, source, predictor, *, save_probs, uncertainty, aug, onnx):
        if aug and onnx and any(s != 1.0 for s in predictor.cfg.eval.aug.scales):
            raise UserError("--aug-test: the exported graphs take one input size, so the "
                            "multi-scale test needs --runtime torch (or eval.aug.scales=[1.0])")

    def metric(self, dataset, cfg: Config, device: torch.device, boundary: bool = True):
        return SegMetric(dataset.num_classes, dataset.ignore_index, cfg.eval.boundary_dilation,
                         device=device, boundary=boundary)

    def uncertainty_metrics(self, model, cfg, steps, shared, device):
        # every model's softmax entropy (a discriminative one's comes for free); diffusion
        # models with whole-image inference also the paper's step-change map
        kinds = ("steps", "entropy") if shared else ("entropy",)
        return {k: UncertaintyMetric(device=device) for k in kinds}

    def aug_inputs(self, dataset, index, cfg):
        original = dataset.load(index)[0]  # the uint8 image before the test resize
        return lambda ratio: aug_input(original, cfg.data, ratio)

    def image_outputs(self, model, cfg, feat, img, size, steps, seeds, aug, scale_input=None):
        if feat is not None:
            probs, _, maps = uncertainty_maps(model, feat, steps, size, model.accumulation,
                                              seeds, in_size=img.shape[-2:])
            return probs, maps
        kw = {"steps": steps, "seeds": seeds} if is_diffusion(model) else {}
        probs = predict_probs(model, img, cfg.eval, ori_size=size, aug=aug,
                              scale_input=scale_input, **kw)
        return probs, {"entropy": entropy_uncertainty(probs)}

    def update_metrics(self, metric, unc, pred, maps, label, dataset):
        labels = class_ids(pred)
        metric.update(labels, label)
        valid = label != dataset.ignore_index
        for k, m in maps.items():
            unc[k].update(m, labels != label, valid)

    def score_trajectory(self, model, metric, traj, label):
        scores = F.interpolate(traj.output(model.accumulation), size=label.shape[-2:],
                               mode="bilinear", align_corners=False)
        metric.update(class_ids(scores), label)

    def change_rates(self, traj) -> list[float]:
        """From step s - 1 to s (s = 2..S): the share of pixels whose label changes."""
        m = torch.stack([class_ids(lg) for lg in traj.step_outputs()])
        return [float((m[s] != m[s - 1]).float().mean()) for s in range(1, len(m))]

    def format_metrics(self, metrics, class_names):
        return format_metrics(metrics, class_names)

    plot_keys = ("mIoU", "mBIoU")

    def steps_table(self, results):
        from densediff.viz import seg_steps_table

        return seg_steps_table(results)

    def output_names(self, predictor, uncertainty, trajectory, save_probs):
        kinds = ["mask.png", "color.png", "overlay.png"]
        if uncertainty:
            kinds += ["entropy.png"] + (["uncertainty.png"] if predictor.is_diffusion else [])
        if trajectory:
            kinds.append("trajectory.png")
        if predictor.cfg.model.type == "ddps":
            kinds += ["base.png", "compare.png"]
        if save_probs:
            kinds.append("probs.npy")
        return kinds

    @torch.no_grad()
    def predict(self, predictor, item, *, aug=False, steps=None, seed=0, starts=None
                ) -> Prediction:
        """One image through ``predictor``'s model: the mask and probabilities at the original
        size, and for diffusion models with whole-image inference the step-change uncertainty
        and the trajectory."""
        return self.predict_batch(predictor, [item], aug=aug, steps=steps, seeds=[seed],
                                  starts=starts)[0]

    @torch.no_grad()
    def predict_batch(self, predictor, items, *, aug=False, steps=None, seeds, starts=None
                      ) -> list:
        """Images through ``predictor``'s model; diffusion models with whole-image inference
        and no ``aug`` run the encoder and the sampler once per group of same-size images
        (:func:`~densediff.pipelines.base.batch_groups`), each image with its own seed, so
        the results are those of one image at a time."""
        model, cfg = predictor.model, predictor.cfg
        n = resolve_steps(model, steps, "this checkpoint")[0]
        settings = check_starts(model, starts)
        inputs = [self.image_tensor(predictor, it) for it in items]
        out: list = [None] * len(inputs)
        if not (is_diffusion(model) and cfg.eval.mode == "whole" and not aug):
            for i, ((rgb, x), seed) in enumerate(zip(inputs, seeds)):
                out[i] = self._predict_one(predictor, rgb, x, n, seed, aug, settings)
            return out
        for group in batch_groups(inputs):
            x = torch.cat([inputs[i][1] for i in group])
            size = inputs[group[0]][0].shape[:2]
            with batch_invariant(model, len(group)):
                feat = model.extract(x)
                probs, step_labels, maps = uncertainty_maps(model, feat, n, size,
                                                            model.accumulation,
                                                            [seeds[i] for i in group],
                                                            in_size=x.shape[-2:], **settings)
            base = getattr(feat, "logits", None)  # DDPS: the base segmentor's logits
            if base is not None:
                base = F.interpolate(base, size=size, mode="bilinear", align_corners=False)
            for b, i in enumerate(group):
                extra = {"steps": n, "uncertainty": maps["steps"][b].cpu().numpy(),
                         "trajectory": step_labels[:, b].cpu().numpy().astype(np.int64)}
                if base is not None:
                    extra["base_mask"] = base[b].argmax(0).cpu().numpy().astype(np.int64)
                out[i] = self._result(predictor, inputs[i][0], probs[b], extra)
        return out

    def _predict_one(self, predictor, rgb, x, n, seed, aug, settings) -> Prediction:
        """Sliding-window, multi-scale or discriminative inference of one image."""
        model, cfg = predictor.model, predictor.cfg
        size = rgb.shape[:2]
        scale_input = (lambda ratio: aug_input(rgb, cfg.data, ratio)) if aug else None
        if not is_diffusion(model):
            probs = predict_probs(model, x, cfg.eval, ori_size=size, aug=aug,
                                  scale_input=scale_input)
            return self._result(predictor, rgb, probs[0], {})
        probs = predict_probs(model, x, cfg.eval, ori_size=size, aug=aug, steps=n,
                              seeds=[seed], scale_input=scale_input, **settings)
        return self._result(predictor, rgb, probs[0], {"steps": n})

    def _result(self, predictor, rgb: np.ndarray, probs: torch.Tensor, extra: dict
                ) -> Prediction:
        """The :class:`Prediction` of one image from its ``K x H x W`` probabilities."""
        from densediff.viz import colorize, overlay

        cfg = predictor.cfg
        probs = probs.float()
        mask = probs.argmax(0).cpu().numpy().astype(np.int64)
        color = colorize(mask, predictor.palette, cfg.data.ignore_index)
        return Prediction(mask=mask, probs=probs.cpu().numpy(), color=color,
                          overlay=overlay(rgb, color),
                          entropy=entropy_uncertainty(probs[None])[0].cpu().numpy(),
                          image=rgb, class_names=list(predictor.class_names),
                          palette=predictor.palette, ignore_index=cfg.data.ignore_index,
                          **extra)
