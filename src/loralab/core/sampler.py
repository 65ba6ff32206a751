"""Batches of indices whose order is a pure function of (seed, epoch).

That one property buys three things: a resumed run replays exactly the batches it missed (``start_batch``), every
DDP rank agrees on the epoch's order without communicating, and length-grouping can be shuffled per epoch yet
reproducible.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from loralab.errors import ConfigError


class EpochBatchSampler(Sampler[list[int]]):
    """Shuffled micro-batches; with ``group_by_length`` each batch holds similar lengths (less padding).

    Length grouping is bucketed, as in HF's ``LengthGroupedSampler``: shuffle, cut into mega-batches of
    ``bucket_size`` batches, sort each by length, then shuffle the batch order. ``rank``/``world_size`` give each
    process every ``world_size``-th batch. Shards are disjoint and every rank runs the same number of batches (a
    rank with one batch more would wait forever in the gradient all-reduce): the epoch's last ``len % world_size``
    batches are dropped, a different few each epoch when shuffled, as ``DistributedSampler(drop_last=True)`` does.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int,
        *,
        shuffle: bool = True,
        group_by_length: bool = True,
        bucket_size: int = 50,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.lengths = list(lengths)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.group_by_length, self.bucket_size = group_by_length, bucket_size
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order; skip its first ``start_batch`` batches (resuming mid-epoch)."""
        self.epoch, self.start_batch = epoch, start_batch

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of epoch ``epoch``, from its first."""
        n = len(self.lengths)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        if self.group_by_length:
            mega = self.batch_size * self.bucket_size
            order = [i for s in range(0, n, mega) for i in sorted(order[s : s + mega], key=lambda i: -self.lengths[i])]
        batches = [order[s : s + self.batch_size] for s in range(0, n, self.batch_size)]
        if self.shuffle and self.group_by_length:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        if self.world_size > 1:
            batches = batches[: len(batches) // self.world_size * self.world_size][self.rank :: self.world_size]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.epoch_batches(self.epoch)[self.start_batch :]

    def __len__(self) -> int:
        """Batches in a full epoch for this rank (independent of ``start_batch``)."""
        total = -(-len(self.lengths) // self.batch_size)
        return total // self.world_size


def accumulation_steps(batch_size: int, micro_batch_size: int | None) -> int:
    """Micro-batches per optimizer step, so ``optim.batch_size`` means the same on every hardware profile."""
    if micro_batch_size is None or micro_batch_size >= batch_size:
        return 1
    if batch_size % micro_batch_size:
        raise ConfigError(
            f"optim.batch_size={batch_size!r}: not divisible by hardware.micro_batch_size="
            f"{micro_batch_size}; pick a batch size that is a multiple of it"
        )
    return batch_size // micro_batch_size
