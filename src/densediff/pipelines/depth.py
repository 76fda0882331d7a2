"""Monocular depth, end to end (DDP §4.4): a depth model's outputs from its trajectory, one
image's metric update, :class:`DepthPrediction` with the files ``predict`` writes, and its
pictures."""

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
from densediff.criteria.depth import (
    DepthMetric,
    DepthUncertaintyMetric,
    depth_spread,
    format_depth_metrics,
)
from densediff.errors import UserError
from densediff.models.interface import Trajectory
from densediff.pipelines.base import (
    Pipeline,
    StepViews,
    batch_groups,
    check_starts,
    is_diffusion,
    resolve_steps,
    write_files,
)
from densediff.pipelines.inference import predict_depth
from densediff.utils.batching import batch_invariant

__all__ = ["DepthPipeline", "DepthPrediction", "depth_uncertainty_maps", "trajectory_spread"]


def trajectory_spread(traj: Trajectory, over: str) -> torch.Tensor | None:
    """B x 1 x h x w uncertainty of a depth trajectory: the population standard deviation of
    the depth over the ``steps`` (every step and start) or over the random ``starts`` of the
    last step. None when there is only one step / start."""
    if over == "steps":
        x = torch.stack(traj.steps)  # S x B x R x 1 x h x w
        if x.shape[0] * x.shape[2] < 2:
            return None
        return depth_spread(x.transpose(1, 2).flatten(0, 1))  # (S R) x B x 1 x h x w
    if over == "starts":
        x = traj.steps[-1]
        return depth_spread(x.transpose(0, 1)) if x.shape[1] > 1 else None
    raise ValueError(f"spread over 'steps' or 'starts', not {over!r}")


@torch.no_grad()
def depth_uncertainty_maps(model: nn.Module, feat: torch.Tensor, steps: int,
                           out_size: tuple[int, int], accumulation: bool,
                           seeds: Sequence[int] | None = None, **settings
                           ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Sample ``steps`` steps of a depth model from features; outputs at ``out_size``
    (``settings`` go to ``sample_steps``, e.g. ``randsteps``).

    Returns:
        ``(depth B x H x W, step_depths S x B x H x W, maps)``: the output depth, every
        step's depth, and the uncertainty maps (B x H x W, metres): ``steps``, the standard
        deviation over steps (and starts), and ``starts``, over the random starts of the last
        step; each only when there are at least two.
    """
    traj = model.sample_steps(feat, steps, seeds=seeds, **settings)

    def up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)[:, 0]

    maps = {k: up(v) for k in ("steps", "starts")
            if (v := trajectory_spread(traj, k)) is not None}
    step_depths = torch.stack([up(d) for d in traj.step_outputs()])
    return up(traj.output(accumulation)), step_depths, maps


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


@dataclass
class DepthPrediction(StepViews):
    """Result of :meth:`~densediff.api.Predictor.predict` for one image of a depth model
    (original size).

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
        image, min_depth, max_depth, depth_scale: the input, the depth range (metres) and the
            16-bit PNG value per metre (for the files and pictures).
    """

    depth: np.ndarray
    color: np.ndarray
    steps: int | None = None
    uncertainty: np.ndarray | None = None
    uncertainty_starts: np.ndarray | None = None
    trajectory: np.ndarray | None = None
    image: np.ndarray | None = field(default=None, repr=False)
    min_depth: float = field(default=1e-3, repr=False)
    max_depth: float = field(default=10.0, repr=False)
    depth_scale: float = field(default=1000.0, repr=False)

    def video_frame(self) -> np.ndarray:
        """This result as one frame of a predicted video (``predict`` on a video): the image
        and the colourised depth side by side (H x 2W x 3 uint8)."""
        from densediff.viz import side_by_side

        return self.color if self.image is None else side_by_side([self.image, self.color])

    def trajectory_strip(self) -> np.ndarray:
        """[image,] the colourised depth of every step and the uncertainty heatmap (scaled to
        its maximum) side by side (H x W' x 3 uint8, no labels)."""
        from densediff.errors import UserError
        from densediff.viz import depth_color, scaled_heatmap, side_by_side

        if self.trajectory is None:
            raise UserError("no trajectory: it needs a diffusion model with whole-image inference")
        tiles = [] if self.image is None else [self.image]
        tiles += [depth_color(d, self.min_depth, self.max_depth) for d in self.trajectory]
        if self.uncertainty is not None:
            tiles.append(scaled_heatmap(self.uncertainty))
        return side_by_side(tiles)

    def save_trajectory(self, path: str | Path):
        """The labelled trajectory picture: image | step 1 .. S (depth colour bar in metres) |
        uncertainty (spread in metres)."""
        from densediff.errors import UserError
        from densediff.viz import ColorScale, GridColumn, nice_ceil, save_labelled_grid

        if self.trajectory is None:
            raise UserError("--trajectory: needs whole-image inference without --aug-test")
        scale = ColorScale("magma_r", self.min_depth, self.max_depth,
                           "depth (m): bright = near, dark = far")
        tiles, cols = [], []
        if self.image is not None:
            tiles.append(self.image)
            cols.append(GridColumn("image"))
        n = len(self.trajectory)
        for s, d in enumerate(self.trajectory, 1):
            tiles.append(scale.colorize(d))
            cols.append(GridColumn(f"step {s} of {n}", scale))
        if self.uncertainty is not None:
            u = ColorScale("inferno", 0, nice_ceil(float(self.uncertainty.max())),
                           "spread (std) of the depth over the steps (m)")
            tiles.append(u.colorize(self.uncertainty))
            cols.append(GridColumn("uncertainty", u))
        return save_labelled_grid([tiles], cols, path,
                                  title=f"Depth sampling trajectory ({n} steps)")

    # -- the pictures of the web page (densediff.app) and the summary -----------------------
    def _scale(self):
        from densediff.viz import ColorScale

        return ColorScale("magma_r", self.min_depth, self.max_depth,
                          "depth (m): bright = near, dark = far")

    def input_view(self):
        """The input image (:class:`~densediff.viz.Picture`)."""
        from densediff.viz import Picture

        return Picture("image", self.image)

    def prediction_view(self):
        """The colourised depth with its colour bar in metres."""
        from densediff.viz import Picture

        what = "depth" if self.steps is None else f"depth after {self.steps} steps"
        return Picture(what, self.color, self._scale())

    def uncertainty_view(self):
        """The depth's spread (metres) over the steps, else over the random starts, with its
        colour bar; None when there is neither (one step, one start, or no diffusion)."""
        from densediff.viz import ColorScale, Picture, nice_ceil

        for u, over in ((self.uncertainty, "the steps"), (self.uncertainty_starts,
                                                          "the random starts")):
            if u is not None:
                scale = ColorScale("inferno", 0, nice_ceil(float(u.max())),
                                   f"spread (std) of the depth over {over} (m)")
                return Picture("uncertainty", scale.colorize(u), scale)
        return None


    def step_view(self, step: int):
        """Step ``step`` (1 .. :attr:`num_steps`): its colourised depth and colour bar."""
        from densediff.viz import Picture, depth_color

        n = self.step_count(step)
        return Picture(f"step {step} of {n}", depth_color(self.trajectory[step - 1],
                                                          self.min_depth, self.max_depth),
                       self._scale())

    def summary(self) -> dict:
        """What the prediction holds, JSON-ready: size, steps, the depth's range and mean
        (metres), the mean uncertainty (metres)."""
        h, w = self.depth.shape
        out = {"task": "depth", "height": int(h), "width": int(w), "steps": self.steps,
               "depth_m": {k: round(float(f(self.depth)), 6)
                           for k, f in (("min", np.min), ("mean", np.mean), ("max", np.max))}}
        for key, u in (("mean_uncertainty_m", self.uncertainty),
                       ("mean_uncertainty_starts_m", self.uncertainty_starts)):
            if u is not None:
                out[key] = round(float(u.mean()), 6)
        return out

    def save(self, out_dir: str | Path, stem: str, uncertainty: bool = False,
             trajectory: bool = False, save_probs: bool = False,
             note: Callable[[str], None] = _note) -> list[str]:
        """Write ``<stem>_depth.png`` (colourised), ``_depth16.png`` (16-bit, ``depth_scale``
        per metre), ``_depth.npy`` (metres); with ``uncertainty`` the heatmap and .npy (metres);
        with ``trajectory`` the labelled trajectory picture. Returns the suffixes written."""
        from densediff.viz import scaled_heatmap

        written = {"depth.png": self.color, "depth.npy": self.depth.astype(np.float32),
                   "depth16.png": np.clip(np.round(self.depth * self.depth_scale), 0,
                                          65535).astype(np.uint16)}
        if uncertainty:
            if self.uncertainty is None:
                note(f"{stem}: no uncertainty map (it needs a diffusion model, whole-image "
                     "inference without --aug-test, and 2+ steps or random starts)")
            else:
                written["uncertainty.png"] = scaled_heatmap(self.uncertainty)
                written["uncertainty.npy"] = self.uncertainty.astype(np.float32)
        if trajectory:
            written["trajectory.png"] = self.save_trajectory
        return write_files(out_dir, stem, written)


class DepthPipeline(Pipeline):
    """``task: depth``."""

    name = "depth"
    aug_name = "flip"

    def check_predict_options(self, source, predictor, *, save_probs, uncertainty, aug, onnx):
        super().check_predict_options(source, predictor, save_probs=save_probs,
                                      uncertainty=uncertainty, aug=aug, onnx=onnx)
        if uncertainty and (not predictor.is_diffusion or aug):
            raise UserError(f"--uncertainty: a depth uncertainty map needs a diffusion model "
                            f"and whole-image inference without --aug-test ({source})")

    def shares_encoder(self, model, cfg, aug):
        return is_diffusion(model) and not aug  # depth inference is whole-image

    def metric(self, dataset, cfg: Config, device: torch.device, boundary: bool = True):
        dd = cfg.data.depth
        return DepthMetric(dd.min_depth, dd.max_depth, dd.eval_crop, device=device)

    def uncertainty_metrics(self, model, cfg, steps, shared, device):
        if not shared:
            return {}
        dd = cfg.data.depth
        r = model.diffusion_cfg.randsteps
        kinds = (["steps"] if steps * r >= 2 else []) + (["starts"] if r > 1 else [])
        return {k: DepthUncertaintyMetric(dd.min_depth, dd.max_depth, dd.eval_crop,
                                          device=device) for k in kinds}

    def image_outputs(self, model, cfg, feat, img, size, steps, seeds, aug, scale_input=None):
        if feat is not None:
            depth, _, maps = depth_uncertainty_maps(model, feat, steps, size, model.accumulation,
                                                    seeds)
            return depth, maps
        kw = {"steps": steps, "seeds": seeds} if is_diffusion(model) else {}
        return predict_depth(model, img, size, flip=aug, **kw), {}

    def update_metrics(self, metric, unc, pred, maps, label, dataset):
        metric.update(pred, label)
        for k, m in maps.items():
            unc[k].update(m, pred, label)

    def score_trajectory(self, model, metric, traj, label):
        depth = F.interpolate(traj.output(model.accumulation), size=label.shape[-2:],
                              mode="bilinear", align_corners=False)[:, 0]
        metric.update(depth, label)

    def change_rates(self, traj) -> list[float]:
        """From step s - 1 to s: the mean absolute depth change over the mean depth."""
        d = traj.step_outputs()
        return [float((d[s] - d[s - 1]).abs().mean() / d[s - 1].abs().mean().clamp(min=1e-12))
                for s in range(1, len(d))]

    def format_metrics(self, metrics, class_names):
        return format_depth_metrics(metrics)

    plot_keys, plot_ylabel = ("abs_rel", "rmse_log"), "error (lower is better)"

    def steps_table(self, results):
        from densediff.viz import depth_steps_table

        return depth_steps_table(results)

    def output_names(self, predictor, uncertainty, trajectory, save_probs):
        _depth_scale(predictor.cfg)  # a folder dataset without data.depth.depth_scale: now
        return ["depth.png", "depth16.png", "depth.npy", "uncertainty.png", "uncertainty.npy",
                "trajectory.png"]

    @torch.no_grad()
    def predict(self, predictor, item, *, aug=False, steps=None, seed=0, starts=None
                ) -> DepthPrediction:
        """One image through a depth model (``aug``: the flip test)."""
        return self.predict_batch(predictor, [item], aug=aug, steps=steps, seeds=[seed],
                                  starts=starts)[0]

    @torch.no_grad()
    def predict_batch(self, predictor, items, *, aug=False, steps=None, seeds, starts=None
                      ) -> list:
        """Images through a depth model; diffusion models without the flip test run the
        encoder and the sampler once per group of same-size images, each image with its own
        seed (the results of one image at a time)."""
        model = predictor.model
        n = resolve_steps(model, steps, "this checkpoint")[0]
        settings = check_starts(model, starts)
        inputs = [self.image_tensor(predictor, it) for it in items]
        out: list = [None] * len(inputs)
        if not is_diffusion(model) or aug:
            for i, ((rgb, x), seed) in enumerate(zip(inputs, seeds)):
                if not is_diffusion(model):
                    depth, extra = predict_depth(model, x, rgb.shape[:2], flip=aug), {}
                else:
                    depth = predict_depth(model, x, rgb.shape[:2], flip=True, steps=n,
                                          seeds=[seed], **settings)
                    extra = {"steps": n}
                out[i] = self._result(predictor, rgb, depth[0], extra)
            return out
        for group in batch_groups(inputs):
            x = torch.cat([inputs[i][1] for i in group])
            with batch_invariant(model, len(group)):
                depth, step_depths, maps = depth_uncertainty_maps(
                    model, model.extract(x), n, inputs[group[0]][0].shape[:2],
                    model.accumulation, [seeds[i] for i in group], **settings)
            for b, i in enumerate(group):
                extra = {"steps": n, "trajectory": step_depths[:, b].cpu().numpy()}
                for key, name in (("steps", "uncertainty"), ("starts", "uncertainty_starts")):
                    if key in maps:
                        extra[name] = maps[key][b].cpu().numpy()
                out[i] = self._result(predictor, inputs[i][0], depth[b], extra)
        return out

    def _result(self, predictor, rgb: np.ndarray, depth: torch.Tensor, extra: dict
                ) -> DepthPrediction:
        """The :class:`DepthPrediction` of one image from its ``H x W`` depth (metres)."""
        from densediff.viz import depth_color

        cfg = predictor.cfg
        dd = cfg.data.depth
        d = depth.clamp(dd.min_depth, dd.max_depth).cpu().numpy().astype(np.float32)
        return DepthPrediction(depth=d, color=depth_color(d, dd.min_depth, dd.max_depth),
                               image=rgb, min_depth=dd.min_depth, max_depth=dd.max_depth,
                               depth_scale=_depth_scale(cfg), **extra)


def _depth_scale(cfg: Config) -> float:
    from densediff.data.depth import depth_scale_for

    dd = cfg.data
    return depth_scale_for(dd.dataset, dd.depth.depth_scale, dd.depth.max_depth)
