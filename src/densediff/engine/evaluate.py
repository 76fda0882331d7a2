"""Evaluate a model on a dataset split (single process or sharded under torch.distributed):
the generic loop over this process's images, feeding the task's
:class:`~densediff.pipelines.base.Evaluator` (``reset`` / ``process`` / ``result``).

Diffusion models (:class:`~densediff.models.DDP` and its depth / BEV variants,
:class:`~densediff.models.DDPS`) can be scored at several step counts in one pass (dynamic
inference): the encoder runs once per image and each requested step count runs its own
trajectory from the same seeded noise. Their results also carry uncertainty scores: how well
each uncertainty map flags wrong pixels.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from densediff.config import Config
from densediff.pipelines import is_diffusion, resolve_steps
from densediff.tasks import spec_for
from densediff.utils import distributed as du
from densediff.utils.precision import autocast

__all__ = ["evaluate", "evaluate_steps"]


def evaluate_steps(model: nn.Module, dataset, cfg: Config, steps: Sequence[int] | None = None,
                   aug: bool = False, progress: bool = True, precision: str = "fp32"
                   ) -> dict[int, dict]:
    """Metrics of ``model`` on ``dataset`` (built with ``train=False``) for each step count.

    One image at a time: the test-resized image is predicted, the probabilities are resized to
    the original image size and their argmax is scored against the label at original size, as
    mmseg does. Whole-image diffusion inference shares the encoder pass between step counts;
    sliding-window or multi-scale + flip (``aug``) inference goes through
    :func:`~densediff.pipelines.inference.predict_probs` once per step count.

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
        precision: ``fp32`` or ``bf16`` (autocast; see :mod:`densediff.utils.precision`).

    Returns:
        ``{steps: metrics}`` with :meth:`SegMetric.compute`'s aAcc, mIoU, mAcc, mBIoU (percent)
        and ``per_class``; for diffusion models also ``uncertainty``: ``{"steps": ...,
        "entropy": ...}`` each with :meth:`UncertaintyMetric.compute`'s AUROC, err_top10,
        err_all (percent). The step-change map needs every step, so it is only available
        with whole-image inference without ``aug``.

        ``task: depth``: :class:`~densediff.criteria.depth.DepthMetric`'s d1..silog per step count
        (GT and predictions at the original size, ``data.depth`` caps and ``eval_crop``);
        ``aug`` is the flip test; diffusion models add ``uncertainty`` ``{"steps", "starts"}``
        scored by :class:`~densediff.criteria.depth.DepthUncertaintyMetric` (whole-image
        inference without ``aug`` only).

        ``task: bev``: :class:`~densediff.criteria.bev.BEVIoUMetric`'s mIoU (mean over classes of
        the best IoU over thresholds 0.35..0.65), mIoU@0.50, per_class, table per step count;
        diffusion models add ``uncertainty`` ``{"steps", "entropy"}`` scored per class and
        cell against the cells wrong at threshold 0.5.
    """
    model = du.unwrap(model)
    diffusion = is_diffusion(model)
    steps = resolve_steps(model, steps if diffusion else None, key="steps")
    pipe = spec_for(cfg).pipeline
    pipe.check_aug(aug, "this model", key="aug")
    evaluator = pipe.evaluator(model, dataset, cfg, steps, aug, next(model.parameters()).device)
    for index, img, label in _images(model, dataset, cfg, progress, precision):
        evaluator.process(index, img, label)
    return evaluator.result()


def _images(model: nn.Module, dataset, cfg: Config, progress: bool, precision: str = "fp32"
            ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """This process's share of the dataset, one image at a time, as ``(index, image, label)``
    on the model's device: the test-resized image without padding and the label at the
    original size. The model is in eval mode, inference mode and ``precision``'s autocast
    meanwhile; its mode is restored afterwards."""
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
        with torch.inference_mode(), autocast(precision, device):
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


def evaluate(model: nn.Module, dataset, cfg: Config, aug: bool = False,
             progress: bool = True, steps: int | None = None, precision: str = "fp32") -> dict:
    """Metrics at one setting (diffusion models: ``steps``, default the model's
    ``default_steps``); see :func:`evaluate_steps`."""
    out = evaluate_steps(model, dataset, cfg, None if steps is None else [steps], aug, progress,
                         precision)
    return next(iter(out.values()))
