"""Exponential moving average of model weights."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """A frozen copy of a model whose state follows ``ema = decay * ema + (1 - decay) * model``.

    Every floating-point entry of the state dict (parameters and buffers such as BatchNorm
    running statistics) is averaged; integer buffers (``num_batches_tracked``) are copied.
    The copy starts equal to the model and is always in eval mode.

    Args:
        model: the (unwrapped, not DDP) model to follow.
        decay: weight of the old average, in (0, 1).
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average one step towards ``model``'s current weights."""
        ema_f, new_f = [], []
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
            if e.is_floating_point():
                ema_f.append(e)
                new_f.append(m.detach())
            else:
                e.copy_(m)
        if ema_f:
            torch._foreach_lerp_(ema_f, new_f, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()
