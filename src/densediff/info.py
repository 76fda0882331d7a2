"""``densediff info``: parameter counts, a FLOPs estimate and a data summary for a config."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from densediff.config import Config
from densediff.errors import UserError


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def estimate_flops(model: torch.nn.Module, x) -> int:
    """FLOPs of one inference pass on the input ``x`` (the model's default steps; counted by
    torch's FlopCounterMode: matmuls and convolutions, 2 FLOPs per multiply-add)."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)  # every model's forward without a label is its inference path
    return counter.get_total_flops()


def describe(cfg: Config, size: tuple[int, int] | None = None) -> str:
    from densediff.tasks import build_dataset, build_model, class_info, spec_for

    lines = []
    names, _ = class_info(cfg)
    model = build_model(cfg, len(names))
    lines.append(f"task: {cfg.task}   dataset: {cfg.data.dataset}   classes: {len(names)}")
    lines.append("parameters:")
    for name, child in model.named_children():
        lines.append(f"  {name:<14} {count_params(child) / 1e6:9.3f} M")
    lines.append(f"  {'total':<14} {count_params(model) / 1e6:9.3f} M")
    pipe = spec_for(cfg).pipeline
    if size is None and pipe.image_input:
        size = cfg.data.train_pipeline.crop_size or cfg.data.test_scale or (512, 512)
    x, size = pipe.example_input(cfg, size, 1, torch.device("cpu"))
    flops = estimate_flops(model, x)
    steps = ""
    if cfg.model.type in ("ddp", "ddps"):
        steps = f" with {model.default_steps} sampling steps"
    what = "image" if pipe.image_input else f"sample ({len(cfg.data.bev.cameras)} cameras)"
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
