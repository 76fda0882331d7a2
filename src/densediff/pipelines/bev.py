"""BEV map segmentation, end to end (DDP §4.3): a BEV model's outputs from its trajectory, one
sample's metric update, :class:`BEVPrediction` with the files ``predict`` writes, and its
pictures. Inputs are samples of the checkpoint's dataset (calibrated cameras [+ LiDAR]), not
image files."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from densediff.config import Config
from densediff.criteria.bev import BEVIoUMetric, format_bev_metrics
from densediff.criteria.uncertainty import (
    UncertaintyMetric,
    entropy_uncertainty,
    step_change_uncertainty,
)
from densediff.errors import UserError
from densediff.pipelines.base import (
    Pipeline,
    StepViews,
    check_starts,
    is_diffusion,
    resolve_steps,
    write_files,
)

__all__ = ["BEVPipeline", "BEVPrediction", "bev_uncertainty_maps"]


@torch.no_grad()
def bev_uncertainty_maps(model: nn.Module, feat: torch.Tensor, steps: int, accumulation: bool,
                         seeds: Sequence[int] | None = None, **settings
                         ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Sample ``steps`` steps of a BEV model from BEV features (``settings`` go to
    ``sample_steps``, e.g. ``randsteps``).

    Returns:
        ``(probs B x K x X x Y, step_probs S x B x K x X x Y, maps)``: the output
        probabilities, every step's, and per class and cell (B x K x X x Y, in [0, 1]) the
        share of steps whose mask (threshold 0.5) changed (``steps``, DDP §3.4) and the
        normalised binary entropy of the output probability (``entropy``).
    """
    traj = model.sample_steps(feat, steps, seeds=seeds, **settings)
    probs, step_probs = traj.output(accumulation), traj.step_outputs()
    maps = {"steps": step_change_uncertainty((step_probs >= 0.5).long()),
            "entropy": entropy_uncertainty(torch.stack([probs, 1 - probs]), dim=0)}
    return probs, step_probs, maps


@dataclass
class BEVPrediction(StepViews):
    """Result of :meth:`~densediff.api.Predictor.predict` for one BEV sample, on the output
    grid (``[ix, iy]``, x forward, y left; :func:`densediff.viz.bev_image` orients it for
    display).

    Attributes:
        probs: ``(K, X, Y)`` float32 per-class probabilities (multi-label).
        masks: ``(K, X, Y)`` bool, ``probs >= threshold``.
        color: ``(X, Y, 3)`` uint8 picture of ``masks`` (oriented: forward up, left left).
        steps: diffusion sampling steps used (None: a discriminative model).
        uncertainty: ``(K, X, Y)`` float32 in [0, 1], diffusion models: the share of steps at
            which the class mask changed.
        entropy: ``(K, X, Y)`` float32 in [0, 1]: normalised binary entropy of ``probs``.
        trajectory: ``(S, K, X, Y)`` bool masks of every step (diffusion models).
        cameras, truth, class_names, palette: the sample's camera images (uint8), its true
            masks (K x X x Y) and the classes (for the pictures).
    """

    probs: np.ndarray
    masks: np.ndarray
    color: np.ndarray
    steps: int | None = None
    uncertainty: np.ndarray | None = None
    entropy: np.ndarray | None = None
    trajectory: np.ndarray | None = None
    cameras: list[np.ndarray] = field(default_factory=list, repr=False)
    truth: np.ndarray | None = field(default=None, repr=False)
    class_names: list[str] = field(default_factory=list, repr=False)
    palette: np.ndarray | None = field(default=None, repr=False)

    def uncertainty_picture(self) -> np.ndarray | None:
        """X x Y x 3 uint8 heatmap of the classes' maximum step-change share, oriented as
        ``color``; None for a discriminative model."""
        from densediff.viz import bev_image, heatmap

        return None if self.uncertainty is None else heatmap(bev_image(self.uncertainty.max(0)))

    def panel(self) -> np.ndarray:
        """The camera images (two rows of three) beside the predicted map, the ground truth
        and, for diffusion models, the uncertainty (the classes' maximum step-change share);
        maps forward up, left on the left."""
        from PIL import Image

        from densediff.viz import bev_color, camera_mosaic, side_by_side

        mosaic = camera_mosaic(self.cameras)
        tiles = [self.color]
        if self.truth is not None:
            tiles.append(bev_color(self.truth, self.palette))
        if self.uncertainty is not None:
            tiles.append(self.uncertainty_picture())
        size = mosaic.shape[0]
        tiles = [np.asarray(Image.fromarray(t).resize((size, size), Image.NEAREST))
                 for t in tiles]
        return side_by_side([mosaic, *tiles])

    def trajectory_strip(self) -> np.ndarray:
        """The map of every step and the uncertainty side by side (no labels)."""
        from densediff.errors import UserError
        from densediff.viz import bev_color, side_by_side

        if self.trajectory is None:
            raise UserError("no trajectory: it needs a diffusion model")
        return side_by_side([bev_color(m, self.palette) for m in self.trajectory]
                            + [self.uncertainty_picture()])

    def _legend(self) -> list:
        return [*zip(self.class_names, np.asarray(self.palette).tolist()),
                ("no map class", (255, 255, 255))]

    def save_trajectory(self, path: str | Path):
        """The labelled trajectory picture: the map of step 1 .. S | uncertainty, with the
        class legend and the colour bar."""
        from densediff.errors import UserError
        from densediff.viz import ColorScale, GridColumn, bev_color, save_labelled_grid

        if self.trajectory is None:
            raise UserError("--trajectory: needs a diffusion model")
        n = len(self.trajectory)
        tiles = [bev_color(m, self.palette) for m in self.trajectory]
        cols = [GridColumn(f"step {s} of {n}") for s in range(1, n + 1)]
        tiles.append(self.uncertainty_picture())
        cols.append(GridColumn("uncertainty", ColorScale(
            "inferno", 0, 1, "largest share, over the classes, of step-to-step transitions at "
            "which the class mask changed")))
        return save_labelled_grid([tiles], cols, path, legend=self._legend(),
                           legend_title="map classes (later ones drawn on top)",
                           title=f"BEV sampling trajectory ({n} steps); forward up, left on "
                                 "the left")

    # -- the pictures of the web page (densediff.app) and the summary -----------------------
    def input_view(self):
        """The six cameras (:class:`~densediff.viz.Picture`)."""
        from densediff.viz import Picture, camera_mosaic

        return Picture("cameras", camera_mosaic(self.cameras))

    def prediction_view(self):
        """The predicted map (forward up) with the map-class legend."""
        from densediff.viz import Picture

        what = "map" if self.steps is None else f"map after {self.steps} steps"
        return Picture(f"{what} (forward up, left on the left)", self.color,
                       legend=tuple(self._legend()))

    def uncertainty_view(self):
        """The classes' largest step-change share with its colour bar; None for a
        discriminative model."""
        from densediff.viz import ColorScale, Picture

        if self.uncertainty is None:
            return None
        return Picture("uncertainty", self.uncertainty_picture(), ColorScale(
            "inferno", 0, 1, "largest share, over the classes, of step-to-step transitions at "
            "which the class mask changed"))


    def step_view(self, step: int):
        """Step ``step`` (1 .. :attr:`num_steps`): its map, with the legend."""
        from densediff.viz import Picture, bev_color

        n = self.step_count(step)
        return Picture(f"step {step} of {n}", bev_color(self.trajectory[step - 1], self.palette),
                       legend=tuple(self._legend()))

    def summary(self) -> dict:
        """What the prediction holds, JSON-ready: grid size, steps, the share of cells in each
        class's mask, the mean uncertainty."""
        k, x, y = self.masks.shape
        out = {"task": "bev", "grid": [int(x), int(y)], "steps": self.steps,
               "classes": {n: round(float(m.mean()), 6)
                           for n, m in zip(self.class_names, self.masks)}}
        if self.uncertainty is not None:
            out["mean_uncertainty"] = round(float(self.uncertainty.mean()), 6)
        return out

    def save(self, out_dir: str | Path, stem: str, uncertainty: bool = False,
             trajectory: bool = False, save_probs: bool = False,
             note: Callable[[str], None] | None = None) -> list[str]:
        """Write ``<stem>_bev.png`` (the cameras beside the predicted map, the ground truth and,
        for diffusion models, the uncertainty), ``_map.png`` (the map alone), ``_probs.npy``
        (K x X x Y float16); with ``uncertainty`` the heatmap of the classes' maximum and the
        K x X x Y .npy; with ``trajectory`` the labelled picture of every step's map."""
        written = {"bev.png": self.panel(), "map.png": self.color,
                   "probs.npy": self.probs.astype(np.float16)}
        if uncertainty and self.uncertainty is not None:
            written["uncertainty.png"] = self.uncertainty_picture()
            written["uncertainty.npy"] = self.uncertainty.astype(np.float32)
        if trajectory:
            written["trajectory.png"] = self.save_trajectory
        return write_files(out_dir, stem, written)


THRESHOLD = 0.5
"""Probability at which a BEV cell is in a class's mask (the mIoU@0.50 threshold)."""


class BEVPipeline(Pipeline):
    """``task: bev``."""

    name = "BEV"
    has_aug = False
    aug_name = "none"
    image_input = False

    def check_predict_options(self, source, predictor, *, save_probs, uncertainty, aug, onnx):
        if save_probs:
            raise UserError(f"--save-probs: applies to segmentation models; {source} is a BEV "
                            "model (its probabilities are always written)")
        super().check_predict_options(source, predictor, save_probs=save_probs,
                                      uncertainty=uncertainty, aug=aug, onnx=onnx)

    def shares_encoder(self, model, cfg, aug):
        return is_diffusion(model)  # no augmentation, whole grid

    def metric(self, dataset, cfg: Config, device: torch.device, boundary: bool = True):
        return BEVIoUMetric(dataset.class_names, device=device)

    def uncertainty_metrics(self, model, cfg, steps, shared, device):
        if not is_diffusion(model):
            return {}
        return {k: UncertaintyMetric(device=device) for k in ("steps", "entropy")}

    def image_outputs(self, model, cfg, feat, img, size, steps, seeds, aug, scale_input=None):
        if feat is not None:
            probs, _, maps = bev_uncertainty_maps(model, feat, steps, model.accumulation, seeds)
            return probs, maps
        return model.predict_map(img), {}

    def update_metrics(self, metric, unc, pred, maps, label, dataset):
        if maps:
            wrong = (pred >= 0.5) != label.bool()
            for k, m in maps.items():
                unc[k].update(m, wrong)
        metric.update(pred, label)

    def score_trajectory(self, model, metric, traj, label):
        metric.update(traj.output(model.accumulation), label)

    def change_rates(self, traj) -> list[float]:
        """From step s - 1 to s: the share of class cells whose mask (at 0.5) changes."""
        m = traj.step_outputs() >= 0.5
        return [float((m[s] != m[s - 1]).float().mean()) for s in range(1, len(m))]

    def format_metrics(self, metrics, class_names):
        return format_bev_metrics(metrics)

    plot_keys = ("mIoU", "mIoU@0.50")

    def steps_table(self, results):
        from densediff.viz import bev_steps_table

        return bev_steps_table(results)

    def output_names(self, predictor, uncertainty, trajectory, save_probs):
        return ["bev.png", "map.png", "probs.npy", "uncertainty.png", "uncertainty.npy",
                "trajectory.png"]

    def example_input(self, cfg, size, batch, device):
        from densediff.data.worlds.raycast import example_inputs

        bev = cfg.data.bev.model_copy(update={"image_size": tuple(size)} if size else {})
        h, w = bev.image_size
        return example_inputs(bev, batch, device), (int(h), int(w))

    def predict(self, predictor, item, *, aug=False, steps=None, seed=0, starts=None
                ) -> BEVPrediction:
        """The BEV map of one sample of the checkpoint's dataset (its ``image`` dict: cameras,
        intrinsics, cam2ego[, points]); masks at probability >= :data:`THRESHOLD`."""
        return self.predict_batch(predictor, [item], aug=aug, steps=steps, seeds=[seed],
                                  starts=starts)[0]

    @torch.no_grad()
    def predict_batch(self, predictor, items, *, aug=False, steps=None, seeds, starts=None
                      ) -> list:
        """Samples of the checkpoint's dataset through ``predictor``'s model: samples with the
        same camera set-up (the shapes of their inputs; LiDAR point counts may differ) run the
        encoder and the sampler as one batch, each with its own seed, with the per-image
        layers of :func:`~densediff.utils.batching.batch_invariant`."""
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("image"), dict):
                raise UserError("predict: a BEV model takes multi-camera samples of its "
                                "dataset (Predictor.dataset(split)[i]), not an image")
        if aug:
            raise UserError("aug: BEV models have no test-time augmentation")
        from densediff.data import collate
        from densediff.data.datasets import to_device
        from densediff.utils.batching import batch_invariant

        model = predictor.model
        n = resolve_steps(model, steps, "this checkpoint")[0]
        settings = check_starts(model, starts)
        out: list = [None] * len(items)
        for group in _sample_groups(items):
            inputs = to_device(collate([items[i] for i in group])["image"], predictor.device)
            extra: list[dict] = [{} for _ in group]
            with batch_invariant(model, len(group)):
                if not is_diffusion(model):
                    probs = model.predict_map(inputs)
                else:
                    probs, step_probs, maps = bev_uncertainty_maps(
                        model, model.extract(inputs), n, model.accumulation,
                        [seeds[i] for i in group], **settings)
                    extra = [{"steps": n, "uncertainty": maps["steps"][b].cpu().numpy(),
                              "trajectory": (step_probs[:, b] >= THRESHOLD).cpu().numpy()}
                             for b in range(len(group))]
            for b, i in enumerate(group):
                out[i] = self._result(predictor, items[i], probs[b], extra[b])
        return out

    def _result(self, predictor, sample: dict, probs: torch.Tensor, extra: dict
                ) -> BEVPrediction:
        """The :class:`BEVPrediction` of one sample from its ``K x X x Y`` probabilities."""
        from densediff.viz import bev_color

        cfg = predictor.cfg
        p = probs.float()
        masks = (p >= THRESHOLD).cpu().numpy()
        ent = entropy_uncertainty(torch.stack([p, 1 - p]), dim=0).cpu().numpy()
        mean = np.asarray(cfg.data.mean, np.float32)
        std = np.asarray(cfg.data.std, np.float32)
        cams = [np.clip(im.permute(1, 2, 0).cpu().numpy() * std + mean, 0, 255).astype(np.uint8)
                for im in sample["image"]["images"]]
        truth = sample.get("label")
        return BEVPrediction(probs=p.cpu().numpy(), masks=masks,
                             color=bev_color(masks, predictor.palette), entropy=ent,
                             cameras=cams,
                             truth=None if truth is None else np.asarray(truth),
                             class_names=list(predictor.class_names),
                             palette=predictor.palette, **extra)


def _sample_groups(items: Sequence[dict]) -> list[list[int]]:
    """Indices of BEV samples that can share one batch: the same input tensors' shapes
    (cameras, image size, calibration; the LiDAR point count aside, which the batch pads),
    in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, item in enumerate(items):
        key = tuple(sorted((k, tuple(v.shape)) for k, v in item["image"].items()
                           if k != "points" and isinstance(v, torch.Tensor)))
        groups.setdefault((key, "points" in item["image"]), []).append(i)
    return list(groups.values())
