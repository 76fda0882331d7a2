"""Process-group setup for ``torchrun`` and small collective helpers.

Single-process runs need none of this: every helper degrades to a no-op when
``torch.distributed`` is not initialized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from densediff.utils.checks import env_int


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False
    """True when :func:`init_distributed` created the process group (and so destroys it)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Join the process group described by torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK).

    Uses NCCL with one GPU per process when CUDA is available, gloo on CPU. Without those
    variables (or with WORLD_SIZE=1) it returns a single-process description.
    """
    world = env_int("WORLD_SIZE", 1, 1, 65536)
    local_rank = env_int("LOCAL_RANK", 0, 0, 65535)
    env_int("RANK", 0, 0, world - 1)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if world <= 1:
        return DistInfo(device=device)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        owns = True
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=local_rank, device=device, owns_group=owns)


def cleanup_distributed(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over all processes (a copy; the input is left alone)."""
    out = values.clone()
    if is_dist():
        dist.all_reduce(out)
        out /= dist.get_world_size()
    return out


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over all processes, on the tensor's own device (a copy). Counts kept on
    the CPU are moved to the GPU and back when the backend is NCCL."""
    out = values.clone()
    if is_dist():
        buf = out.cuda() if dist.get_backend() == "nccl" and out.device.type != "cuda" else out
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        out = buf.to(values.device)
    return out


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Give every process rank ``src``'s buffers (e.g. BatchNorm running statistics)."""
    if is_dist():
        for b in module.buffers():
            dist.broadcast(b, src)


def all_gather_objects(obj):
    """List of ``obj`` from every rank (rank order); ``[obj]`` when not distributed."""
    if not is_dist():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_dist():
        dist.barrier()


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
