"""The common base of the dataset-level metrics: a :class:`torchmetrics.Metric` with summed
states.

Every metric of :mod:`densediff.criteria` accumulates counts or sums over a dataset (states
registered with ``add_state(..., dist_reduce_fx="sum")``), so the torchmetrics life cycle does
the bookkeeping: ``update`` per batch, ``compute`` (which, under ``torch.distributed``, first
sums the states of all processes and afterwards restores the local ones), ``reset``,
``merge_state`` (add another instance's states) and ``.to(device)`` (moves the states).

:class:`DatasetMetric` adds to it:

* :meth:`~DatasetMetric.reduce`: sum the states over the processes NOW and keep the sums
  (``sync``), for callers that read the states or that want the collective at a fixed point;
  a no-op without a process group, idempotent until ``compute`` / ``reset``. ``compute``
  afterwards works on the sums without syncing again.
* ``compute`` returns a fresh copy of its (cached) result each call, so a caller may add keys
  to it; it does not warn when called before any ``update`` (every metric defines its empty
  result, NaN or 0).
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors

__all__ = ["DatasetMetric", "gather_states", "stack_steps"]


def stack_steps(steps, name: str) -> torch.Tensor:
    """Per-step maps (a tensor S x ..., or a sequence of S tensors) as one S x ... tensor;
    ValueError naming ``name`` when there is no step."""
    if not isinstance(steps, torch.Tensor):
        if len(steps) == 0:
            raise ValueError(f"{name} is empty")
        steps = torch.stack(list(steps))
    if steps.dim() < 1 or steps.shape[0] < 1:
        raise ValueError(f"{name} must be S x ... with S >= 1, got {tuple(steps.shape)}")
    return steps


def gather_states(result: torch.Tensor, group: Any | None = None) -> list[torch.Tensor]:
    """torchmetrics' ``gather_all_tensors``, also for states kept on the CPU under NCCL (which
    only moves CUDA tensors): they travel through the current GPU and come back."""
    if result.device.type != "cuda" and dist.get_backend(group) == "nccl":
        return [t.to(result.device) for t in gather_all_tensors(result.cuda(), group)]
    return gather_all_tensors(result, group)


class DatasetMetric(Metric):
    """Base of the dataset metrics: sum states, :meth:`reduce`, quiet copying ``compute``.

    Keyword arguments go to :class:`torchmetrics.Metric` (e.g. ``sync_on_compute=False`` for a
    score of this process's data only, ``process_group``); ``dist_sync_fn`` defaults to
    :func:`gather_states`.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("dist_sync_fn", gather_states)
        super().__init__(**kwargs)

    def reduce(self) -> None:
        """Sum the states over all processes now (torchmetrics ``sync``; no-op unless
        ``torch.distributed`` is initialised).

        Calling it again does nothing until :meth:`compute` (which restores the local states
        after computing on the sums) or ``reset``. Optional: ``compute`` syncs by itself.
        """
        if not self._is_synced:
            self.sync(dist_sync_fn=self.dist_sync_fn, process_group=self.process_group)

    def sync(self, dist_sync_fn: Callable | None = None, process_group: Any | None = None,
             should_sync: bool = True, distributed_available: Callable | None = None) -> None:
        """torchmetrics ``sync``, skipped when the states are already synced (by
        :meth:`reduce`), so that ``compute`` after ``reduce`` does not sum twice."""
        super().sync(dist_sync_fn, process_group, should_sync and not self._is_synced,
                     distributed_available)

    def _check_not_synced(self) -> None:
        """Refuse an ``update`` between :meth:`reduce` and ``compute`` (it would add local
        values to the summed states, and ``compute`` then restores the local ones)."""
        if self._is_synced:
            raise RuntimeError(f"{type(self).__name__}.update() after reduce(); call compute() "
                               "or reset() first")

    def _wrap_compute(self, compute: Callable) -> Callable:
        wrapped = super()._wrap_compute(compute)

        @functools.wraps(compute)
        def quiet_copy(*args: Any, **kwargs: Any) -> Any:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*``compute`` method of metric",
                                        category=UserWarning)
                return copy.deepcopy(wrapped(*args, **kwargs))

        return quiet_copy
