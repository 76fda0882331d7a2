"""Infinite, sharded, resumable sample order for iteration-based training."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


class InfiniteSampler(Sampler):
    """Yields ``(index, seed)`` items forever, this rank's share of a fresh permutation per epoch.

    Epoch ``e`` shuffles the whole dataset with ``np.random.default_rng([seed, e])``, pads the
    permutation (by repeating its head) to a multiple of ``world_size`` and gives rank ``r``
    the positions ``r, r + world_size, ...`` (as ``DistributedSampler`` does). Each position
    also gets its own augmentation seed drawn from the same generator, so an image seen in two
    epochs is augmented differently, while a given (epoch, position) always gets the same data.

    The order depends only on (seed, epoch, rank, world_size), never on earlier draws, which
    makes resuming exact: ``start`` is the number of items this rank had already consumed.

    Args:
        size: dataset length.
        seed: run seed (``cfg.seed``).
        rank, world_size: this process's shard.
        start: items of this rank's stream to skip.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start: int = 0):
        if size < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.start = start
        self.per_rank = -(-size // world_size)  # ceil: items per rank per epoch

    def epoch_items(self, epoch: int) -> list[tuple[int, int]]:
        """This rank's ``(index, seed)`` items of one epoch, in order."""
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(self.size)
        total = self.per_rank * self.world_size
        perm = np.resize(perm, total)  # pads by repeating from the start
        seeds = rng.integers(0, 2**63 - 1, size=total, dtype=np.int64)
        pos = np.arange(self.rank, total, self.world_size)
        return [(int(perm[p]), int(seeds[p])) for p in pos]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            yield from self.epoch_items(epoch)[offset:]
            epoch, offset = epoch + 1, 0
