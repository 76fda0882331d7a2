"""Evaluate a model on a dataset split (single process or sharded under torch.distributed)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from densediff.config import Config
from densediff.engine import distributed as du
from densediff.engine.inference import predict_probs
from densediff.tasks.segmentation import SegMetric


def evaluate(model: nn.Module, dataset, cfg: Config, aug: bool = False,
             progress: bool = True) -> dict:
    """Segmentation metrics of ``model`` on ``dataset`` (built with ``train=False``).

    One image at a time: the test-resized image goes through
    :func:`~densediff.engine.inference.predict_probs` (``cfg.eval``: whole/slide, optional
    multi-scale + flip when ``aug``), the probabilities are resized to the original image size
    and their argmax is scored against the label at original size, as mmseg does.

    Under ``torch.distributed`` each process scores images ``rank, rank + world, ...`` and
    the counts are summed over processes, so every process returns the same full-set result.
    The model's train/eval mode is restored afterwards; nothing is written.

    Args:
        model: has ``predict_logits(img)`` (a DDP wrapper is unwrapped).
        dataset: a :class:`~densediff.data.SegDataset` (``num_classes``, ``ignore_index``).
        cfg: run config (``cfg.eval``, ``cfg.data.num_workers``).
        aug: multi-scale + flip test (``cfg.eval.aug``).
        progress: show a progress bar (rank 0 only).

    Returns:
        ``SegMetric.compute()``: aAcc, mIoU, mAcc, mBIoU (percent) and ``per_class``.
    """
    from densediff.data import collate

    model = du.unwrap(model)
    device = next(model.parameters()).device
    rank, world = du.rank(), du.world_size()
    indices = list(range(rank, len(dataset), world))
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=1, shuffle=False,
                        num_workers=cfg.data.num_workers, collate_fn=collate,
                        pin_memory=device.type == "cuda",
                        generator=torch.Generator())  # keeps the global RNG untouched
    metric = SegMetric(dataset.num_classes, dataset.ignore_index,
                       cfg.eval.boundary_dilation, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(loader, desc="eval", leave=False, dynamic_ncols=True,
                              disable=not progress or rank != 0):
                meta = batch["meta"][0]
                h, w = meta["ori_size"]
                ih, iw = meta.get("img_size", batch["image"].shape[-2:])  # drop any padding
                img = batch["image"][..., :ih, :iw].to(device, non_blocking=True)
                label = batch["label"][..., :h, :w].to(device, non_blocking=True)
                probs = predict_probs(model, img, cfg.eval, ori_size=(h, w), aug=aug)
                metric.update(probs.argmax(1), label)
    finally:
        model.train(was_training)
    metric.reduce()
    return metric.compute()
