"""``densediff info``: parameter counts, a FLOPs estimate and a data summary for a config."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from densediff.config import Config
from densediff.errors import UserError


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def estimate_flops(model: torch.nn.Module, size: tuple[int, int], bev=None) -> int:
    """FLOPs of one inference pass at ``size`` (the model's default steps; counted by torch's
    FlopCounterMode: matmuls and convolutions, 2 FLOPs per multiply-add). BEV models: one
    sample of ``bev`` (``data.bev``: all cameras at ``image_size``, random points)."""
    from densediff.data.bev import example_inputs

    model.eval()
    x = torch.zeros(1, 3, *size) if bev is None else example_inputs(bev)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)  # every model's forward without a label is its inference path
    return counter.get_total_flops()


def describe(cfg: Config, size: tuple[int, int] | None = None) -> str:
    from densediff.data import build_dataset, class_info
    from densediff.models import build_model

    lines = []
    names, _ = class_info(cfg)
    model = build_model(cfg, len(names))
    lines.append(f"task: {cfg.task}   dataset: {cfg.data.dataset}   classes: {len(names)}")
    lines.append("parameters:")
    for name, child in model.named_children():
        lines.append(f"  {name:<14} {count_params(child) / 1e6:9.3f} M")
    lines.append(f"  {'total':<14} {count_params(model) / 1e6:9.3f} M")
    bev = None
    if cfg.task == "bev":
        bev = cfg.data.bev.model_copy(update={"image_size": tuple(size)} if size else {})
        size = bev.image_size
    elif size is None:
        size = cfg.data.train_pipeline.crop_size or cfg.data.test_scale or (512, 512)
    flops = estimate_flops(model, tuple(size), bev)
    steps = ""
    if cfg.model.type in ("ddp", "ddps"):
        steps = f" with {model.default_steps} sampling steps"
    what = f"sample ({len(bev.cameras)} cameras)" if bev is not None else "image"
    lines.append(f"FLOPs per {what} at {size[0]}x{size[1]}{steps}: {flops / 1e9:.2f} G")
    lines.append("data:")
    for split in (cfg.data.train_split, cfg.data.val_split, cfg.data.test_split):
        try:
            ds = build_dataset(cfg, split, train=False)
            lines.append(f"  {split:<6} {len(ds)} images")
        except UserError as e:
            lines.append(f"  {split:<6} not available: {e}")
    lines.append("classes: " + ", ".join(names))
    return "\n".join(lines)
