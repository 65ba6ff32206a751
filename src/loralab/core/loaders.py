"""Loaders for any task: resumable, length-grouped training batches (this rank's shard under DDP) and the whole
validation set, longest first."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from torch.utils.data import DataLoader, Dataset

from loralab.core.distributed import Dist
from loralab.core.sampler import EpochBatchSampler, accumulation_steps
from loralab.errors import ConfigError

if TYPE_CHECKING:  # the schema is a layer above; loaders only read attributes of it
    from loralab.config.schema import HardwareConf, TrainerConf


@dataclass
class TaskData:
    """What a task's ``build_data`` hands the trainer."""

    train: Dataset
    val: Dataset
    train_lengths: Sequence[int] | None = None  # tokens per train row: batches of similar length pad less
    val_lengths: Sequence[int] | None = None  # tokens per val row: evaluated longest first
    collate: Callable | None = None
    shuffle: bool = True  # False keeps file (time) order, e.g. for time series


def make_loaders(
    data: TaskData, *, batch_size: int, hardware: HardwareConf, trainer: TrainerConf, seed: int, ddp: Dist = Dist()
) -> tuple[DataLoader, DataLoader, int]:
    """(train loader, val loader, accumulation steps) for a global batch of ``batch_size`` rows."""
    if batch_size % ddp.world_size:
        raise ConfigError(
            f"optim.batch_size={batch_size}: the global batch must be divisible by the {ddp.world_size} processes"
        )
    per_rank = batch_size // ddp.world_size
    accum = accumulation_steps(per_rank, hardware.micro_batch_size)
    n_train = len(data.train)  # type: ignore[arg-type]  # map-style datasets are sized; the stubs do not say so
    lengths = data.train_lengths or [1] * n_train
    sampler = EpochBatchSampler(
        lengths,
        per_rank // accum,
        seed,
        shuffle=data.shuffle,
        group_by_length=trainer.group_by_length and data.train_lengths is not None,
        rank=ddp.rank,
        world_size=ddp.world_size,
    )
    if ddp.enabled and len(sampler) == 0:
        raise ConfigError(
            f"optim.batch_size={batch_size}: {n_train} training rows make fewer batches than "
            f"the {ddp.world_size} processes; use a smaller batch or fewer processes"
        )
    train = DataLoader(data.train, batch_sampler=sampler, **loader_args(data.collate, hardware))
    val = eval_loader(data.val, data.val_lengths, data.collate, batch_size=trainer.eval_batch_size, hardware=hardware)
    return train, val, accum


def loader_args(collate: Callable | None, hardware: HardwareConf) -> dict:
    return dict(
        collate_fn=collate,
        num_workers=hardware.num_workers,
        pin_memory=bool(hardware.pin_memory) and str(hardware.device).startswith("cuda"),
    )


def eval_loader(
    dataset: Dataset,
    lengths: Sequence[int] | None,
    collate: Callable | None,
    *,
    batch_size: int,
    hardware: HardwareConf,
) -> DataLoader:
    """A scoring loader (validation, test): longest first when lengths are known (the first batch shows peak
    memory; batches pad little), else file order."""
    order = None if lengths is None else sorted(range(len(dataset)), key=lambda i: -lengths[i])  # type: ignore[arg-type]
    return DataLoader(dataset, batch_size=batch_size, sampler=order, **loader_args(collate, hardware))


def shard(loader: DataLoader, ddp: Dist) -> DataLoader:
    """This rank's every ``world_size``-th row of an ordered evaluation loader; the trainer gathers the shards."""
    if not ddp.enabled:
        return loader
    indices = list(loader.sampler)[ddp.rank :: ddp.world_size]
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=indices,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
    )
