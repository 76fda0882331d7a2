"""Small models built from the default config, for unit tests of the model code."""

from __future__ import annotations

import torch

from densediff.models import DDP
from densediff.tasks import build_model, load_config
from densediff.testing.tiny import SMALL_DDP

__all__ = ["small_model"]


def small_model(*overrides: str, k: int = 6) -> DDP:
    """A :data:`~densediff.testing.tiny.SMALL_DDP` model with ``k`` classes, seeded (0)."""
    torch.manual_seed(0)
    return build_model(load_config(None, [*SMALL_DDP, *overrides]), k)
