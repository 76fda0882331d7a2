"""What the batch benchmarks (``batch_invariance.py``, ``batch_roofline.py``,
``batch_bound.py``) share: a config's model with random weights (the weights do not change
the cost) in a process set up like ``densediff``'s (no-mmap malloc, seed 0), and one whole
prediction on the fast path (gather attention), as ``predict`` runs a batch."""

from __future__ import annotations

import torch

from densediff.decoders.msda import msda_impl
from densediff.tasks import build_model, class_info, load_config
from densediff.utils.alloc import set_glibc_fast
from densediff.utils.batching import batch_invariant


def random_model(config: str):
    """``(cfg, model)``: ``config`` loaded and its model built in eval mode, after seeding
    torch with 0 and turning on glibc's no-mmap settings."""
    torch.manual_seed(0)
    set_glibc_fast(True)
    cfg = load_config(config)
    return cfg, build_model(cfg, len(class_info(cfg)[0])).eval()


def predict(model, x: torch.Tensor, steps: int, exact: bool = False,
            seeds: list[int] | None = None) -> torch.Tensor:
    """``model``'s ``steps``-step prediction of the batch ``x`` (image i with ``seeds[i]``,
    default i) on the gather path; ``exact``: inside :func:`~densediff.utils.batching.batch_invariant`, the
    bit-identical path ``predict`` runs, else with whole-batch kernels."""
    with torch.no_grad(), msda_impl("gather"), batch_invariant(model, len(x) if exact else 1):
        return model.predict_map(x, steps=steps, seeds=seeds or list(range(len(x))))
