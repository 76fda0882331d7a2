"""Evaluate a model on a dataset split (single process or sharded under torch.distributed):
segmentation (class maps) or depth, by ``cfg.task``.

Diffusion models (anything with ``extract`` + ``sample_steps``: :class:`~densediff.models.DDP`,
:class:`~densediff.models.DDPS`) can be scored at several step counts in one pass (dynamic
inference): the encoder runs once per image and each requested step count runs its own
trajectory from the same seeded noise. Their results also carry uncertainty scores: how well
each uncertainty map flags wrong pixels.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from densediff.config import Config
from densediff.engine.inference import predict_depth, predict_probs
from densediff.tasks.depth import DepthMetric, DepthUncertaintyMetric
from densediff.tasks.segmentation import SegMetric, class_ids
from densediff.tasks.uncertainty import UncertaintyMetric, entropy_uncertainty, step_change_uncertainty
from densediff.utils import distributed as du

__all__ = ["bev_uncertainty_maps", "depth_uncertainty_maps", "evaluate", "evaluate_steps",
           "is_diffusion", "sample_seed", "uncertainty_maps"]


def is_diffusion(model: nn.Module) -> bool:
    """True for models that sample (they take ``steps``)."""
    return hasattr(du.unwrap(model), "sample_steps")


def sample_seed(cfg: Config, index: int) -> int:
    """The noise seed of dataset item ``index``: results do not depend on batching, the
    number of processes or the order of evaluation."""
    return cfg.seed * 1_000_003 + index


@torch.no_grad()
def uncertainty_maps(model: nn.Module, feat: torch.Tensor, steps: int, out_size: tuple[int, int],
                     accumulation: bool, seeds: Sequence[int] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Sample ``steps`` steps from features and form the outputs at ``out_size``.

    Returns:
        ``(probs B x K x H x W, step_labels S x B x H x W, {"steps": ..., "entropy": ...})``:
        the output probabilities, every step's label map, and the two uncertainty maps
        (B x H x W in [0, 1]): the paper's count of step-to-step label changes, and the
        normalised entropy of the output probabilities.
    """
    traj = model.sample_steps(feat, steps, seeds=seeds)

    def up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)

    probs = up(traj.scores(accumulation)).softmax(1)
    step_labels = torch.stack([class_ids(up(lg)) for lg in traj.step_logits()])
    unc = {"steps": step_change_uncertainty(step_labels), "entropy": entropy_uncertainty(probs)}
    return probs, step_labels, unc


def evaluate_steps(model: nn.Module, dataset, cfg: Config, steps: Sequence[int] | None = None,
                   aug: bool = False, progress: bool = True) -> dict[int, dict]:
    """Metrics of ``model`` on ``dataset`` (built with ``train=False``) for each step count.

    One image at a time: the test-resized image is predicted, the probabilities are resized to
    the original image size and their argmax is scored against the label at original size, as
    mmseg does. Whole-image diffusion inference shares the encoder pass between step counts;
    sliding-window or multi-scale + flip (``aug``) inference goes through
    :func:`~densediff.engine.inference.predict_probs` once per step count.

    Under ``torch.distributed`` each process scores images ``rank, rank + world, ...`` and the
    counts are summed over processes, so every process returns the same full-set result. The
    model's train/eval mode is restored afterwards; nothing is written.

    Args:
        model: a segmentor (``predict_logits``) or a diffusion model (a DDP wrapper is unwrapped).
        dataset: a :class:`~densediff.data.SegDataset`.
        cfg: run config (``cfg.eval``, ``cfg.model.diffusion``, ``cfg.seed``).
        steps: step counts to score (diffusion models); None: the model's ``default_steps``.
            DDPS also takes 0: its frozen base segmentor's prediction.
            Ignored (one entry, key 0) for discriminative models.
        aug: multi-scale + flip test (``cfg.eval.aug``).
        progress: show a progress bar (rank 0 only).

    Returns:
        ``{steps: metrics}`` with :meth:`SegMetric.compute`'s aAcc, mIoU, mAcc, mBIoU (percent)
        and ``per_class``; for diffusion models also ``uncertainty``: ``{"steps": ...,
        "entropy": ...}`` each with :meth:`UncertaintyMetric.compute`'s AUROC, err_top10,
        err_all (percent). The step-change map needs every step, so it is only available
        with whole-image inference without ``aug``.

        ``task: depth``: :class:`~densediff.tasks.depth.DepthMetric`'s d1..silog per step count
        (GT and predictions at the original size, ``data.depth`` caps and ``eval_crop``);
        ``aug`` is the flip test; diffusion models add ``uncertainty`` ``{"steps", "starts"}``
        scored by :class:`~densediff.tasks.depth.DepthUncertaintyMetric` (whole-image
        inference without ``aug`` only).

        ``task: bev``: :class:`~densediff.tasks.bev.BEVIoUMetric`'s mIoU (mean over classes of
        the best IoU over thresholds 0.35..0.65), mIoU@0.50, per_class, table per step count;
        diffusion models add ``uncertainty`` ``{"steps", "entropy"}`` scored per class and
        cell against the cells wrong at threshold 0.5.
    """
    model = du.unwrap(model)
    diffusion = is_diffusion(model)
    steps = _step_list(model, steps)
    device = next(model.parameters()).device
    if cfg.task == "depth":
        return _evaluate_depth(model, dataset, cfg, steps, aug, progress)
    if cfg.task == "bev":
        if aug:
            raise ValueError("BEV evaluation has no test-time augmentation")
        return _evaluate_bev(model, dataset, cfg, steps, progress)
    seg = {n: SegMetric(dataset.num_classes, dataset.ignore_index, cfg.eval.boundary_dilation,
                        device=device) for n in steps}
    shared = diffusion and cfg.eval.mode == "whole" and not aug
    kinds = ("steps", "entropy") if shared else ("entropy",)
    # every model's softmax entropy (a discriminative one's comes for free); diffusion models
    # also the paper's step-change map
    unc = {n: {k: UncertaintyMetric(device=device) for k in kinds} for n in steps}
    accumulation = model.accumulation if diffusion else False
    for index, img, label in _images(model, dataset, cfg, progress):
        h, w = label.shape[-2:]
        seeds = [sample_seed(cfg, index)]
        valid = label != dataset.ignore_index
        feat = model.extract(img) if shared else None
        for n in steps:
            if shared:
                probs, _, maps = uncertainty_maps(model, feat, n, (h, w), accumulation, seeds)
            else:
                kw = {"steps": n, "seeds": seeds} if diffusion else {}
                probs = predict_probs(model, img, cfg.eval, ori_size=(h, w), aug=aug, **kw)
                maps = {"entropy": entropy_uncertainty(probs)}
            pred = class_ids(probs)
            seg[n].update(pred, label)
            for k, m in maps.items():
                unc[n][k].update(m, pred != label, valid)
    return _results(seg, unc, steps, diffusion)


def _results(metric: dict, unc: dict, steps: list[int], diffusion: bool) -> dict[int, dict]:
    """Reduce over processes and compute each step count's metric and, for diffusion models,
    its uncertainty scores (``uncertainty``)."""
    results = {}
    for n in steps:
        metric[n].reduce()
        results[n] = metric[n].compute()
        if diffusion or unc.get(n):  # a segmentor: its softmax entropy
            for m in unc[n].values():
                m.reduce()
            results[n]["uncertainty"] = {k: m.compute() for k, m in unc[n].items()}
    return results


def _step_list(model: nn.Module, steps: Sequence[int] | None) -> list[int]:
    """The step counts to score: [0] for discriminative models, else ``steps`` (default the
    model's own), deduplicated in order and checked against the model's minimum."""
    if not is_diffusion(model):
        return [0]
    steps = [model.default_steps] if steps is None else steps
    steps = list(dict.fromkeys(int(s) for s in steps))
    if min(steps) < model.min_steps:
        raise ValueError(f"steps must be >= {model.min_steps}, got {steps}")
    return steps


def _images(model: nn.Module, dataset, cfg: Config, progress: bool
            ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """This process's share of the dataset, one image at a time, as ``(index, image, label)``
    on the model's device: the test-resized image without padding and the label at the
    original size. The model is in eval mode and inference mode meanwhile; its mode is
    restored afterwards."""
    from densediff.data import collate
    from densediff.data.datasets import to_device

    device = next(model.parameters()).device
    rank, world = du.rank(), du.world_size()
    indices = list(range(rank, len(dataset), world))
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=1, shuffle=False,
                        num_workers=cfg.data.num_workers, collate_fn=collate,
                        pin_memory=device.type == "cuda",
                        generator=torch.Generator())  # keeps the global RNG untouched
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for index, batch in zip(indices, tqdm(loader, desc="eval", leave=False,
                                                  dynamic_ncols=True,
                                                  disable=not progress or rank != 0)):
                meta = batch["meta"][0]
                h, w = meta["ori_size"]
                label = batch["label"][..., :h, :w].to(device, non_blocking=True)
                if isinstance(batch["image"], dict):  # BEV inputs: cameras, calibration, points
                    yield index, to_device(batch["image"], device), label
                    continue
                ih, iw = meta.get("img_size", batch["image"].shape[-2:])  # drop any padding
                img = batch["image"][..., :ih, :iw].to(device, non_blocking=True)
                yield index, img, label
    finally:
        model.train(was_training)


@torch.no_grad()
def depth_uncertainty_maps(model: nn.Module, feat: torch.Tensor, steps: int,
                           out_size: tuple[int, int], accumulation: bool,
                           seeds: Sequence[int] | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Sample ``steps`` steps of a depth model from features; outputs at ``out_size``.

    Returns:
        ``(depth B x H x W, step_depths S x B x H x W, maps)``: the output depth, every
        step's depth, and the uncertainty maps (B x H x W, metres): ``steps``, the standard
        deviation over steps (and starts), and ``starts``, over the random starts of the last
        step; each only when there are at least two.
    """
    traj = model.sample_steps(feat, steps, seeds=seeds)

    def up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)[:, 0]

    maps = {k: up(v) for k in ("steps", "starts")
            if (v := traj.spread(k)) is not None}
    step_depths = torch.stack([up(d) for d in traj.step_depths()])
    return up(traj.depth(accumulation)), step_depths, maps


def _evaluate_depth(model: nn.Module, dataset, cfg: Config, steps: list[int], aug: bool,
                    progress: bool) -> dict[int, dict]:
    """:func:`evaluate_steps` for depth (see there); ``aug`` is the flip test."""
    dd = cfg.data.depth
    device = next(model.parameters()).device
    diffusion = is_diffusion(model)
    metric = {n: DepthMetric(dd.min_depth, dd.max_depth, dd.eval_crop, device=device)
              for n in steps}
    unc: dict[int, dict] = {n: {} for n in steps}
    if diffusion and not aug:  # the maps each step count yields (the same on every process)
        r = model.diffusion_cfg.randsteps
        for n in steps:
            kinds = (["steps"] if n * r >= 2 else []) + (["starts"] if r > 1 else [])
            unc[n] = {k: DepthUncertaintyMetric(dd.min_depth, dd.max_depth, dd.eval_crop,
                                                device=device) for k in kinds}
    accumulation = model.accumulation if diffusion else False
    for index, img, gt in _images(model, dataset, cfg, progress):
        size = tuple(gt.shape[-2:])
        seeds = [sample_seed(cfg, index)]
        feat = model.extract(img) if diffusion and not aug else None
        for n in steps:
            maps = {}
            if feat is not None:
                depth, _, maps = depth_uncertainty_maps(model, feat, n, size, accumulation, seeds)
            else:
                kw = {"steps": n, "seeds": seeds} if diffusion else {}
                depth = predict_depth(model, img, size, flip=aug, **kw)
            metric[n].update(depth, gt)
            for k, m in maps.items():
                unc[n][k].update(m, depth, gt)
    return _results(metric, unc, steps, diffusion)


@torch.no_grad()
def bev_uncertainty_maps(model: nn.Module, feat: torch.Tensor, steps: int, accumulation: bool,
                         seeds: Sequence[int] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Sample ``steps`` steps of a BEV model from BEV features.

    Returns:
        ``(probs B x K x X x Y, step_probs S x B x K x X x Y, maps)``: the output
        probabilities, every step's, and per class and cell (B x K x X x Y, in [0, 1]) the
        share of steps whose mask (threshold 0.5) changed (``steps``, DDP §3.4) and the
        normalised binary entropy of the output probability (``entropy``).
    """
    traj = model.sample_steps(feat, steps, seeds=seeds)
    probs, step_probs = traj.probs(accumulation), traj.step_probs()
    maps = {"steps": step_change_uncertainty((step_probs >= 0.5).long()),
            "entropy": entropy_uncertainty(torch.stack([probs, 1 - probs]), dim=0)}
    return probs, step_probs, maps


def _evaluate_bev(model: nn.Module, dataset, cfg: Config, steps: list[int], progress: bool
                  ) -> dict[int, dict]:
    """:func:`evaluate_steps` for BEV maps (see there)."""
    from densediff.tasks.bev import BEVIoUMetric

    device = next(model.parameters()).device
    diffusion = is_diffusion(model)
    metric = {n: BEVIoUMetric(dataset.class_names, device=device) for n in steps}
    unc = {n: {k: UncertaintyMetric(device=device) for k in ("steps", "entropy")}
           for n in steps} if diffusion else {}
    accumulation = model.accumulation if diffusion else False
    for index, inputs, label in _images(model, dataset, cfg, progress):
        seeds = [sample_seed(cfg, index)]
        feat = model.extract(inputs) if diffusion else None
        for n in steps:
            if diffusion:
                probs, _, maps = bev_uncertainty_maps(model, feat, n, accumulation, seeds)
                wrong = (probs >= 0.5) != label.bool()
                for k, m in maps.items():
                    unc[n][k].update(m, wrong)
            else:
                probs = model.predict_probs(inputs)
            metric[n].update(probs, label)
    return _results(metric, unc, steps, diffusion)


def evaluate(model: nn.Module, dataset, cfg: Config, aug: bool = False,
             progress: bool = True, steps: int | None = None) -> dict:
    """Metrics at one setting (diffusion models: ``steps``, default the model's
    ``default_steps``); see :func:`evaluate_steps`."""
    out = evaluate_steps(model, dataset, cfg, None if steps is None else [steps], aug, progress)
    return next(iter(out.values()))
