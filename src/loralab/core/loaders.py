"""Loaders for any task: resumable, length-grouped training batches (this rank's shard under DDP) and the whole
validation set, longest first."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence, cast

import torch
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
    train_collate: Callable | None = None  # the training micro-batches' own (hardware.packing: pack_records)


def pack_records(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """A micro-batch of tokenized records in one row, no padding (``hardware.packing``): ``input_ids`` (1, tokens),
    ``position_ids`` restarting at 0 per record (what keeps records apart in attention), ``cu_seqlens`` (records +
    1: where each record starts, then the total; int32 as flash-attention's varlen kernels take it) and the
    ``labels`` of the records in order (what ``loralab.models.packing`` scores)."""
    lengths = [len(f["input_ids"]) for f in features]
    if not lengths or min(lengths) == 0:
        raise ValueError(f"cannot pack records of lengths {lengths}: each needs at least one token")
    batch = {
        "input_ids": torch.tensor([t for f in features for t in f["input_ids"]]).unsqueeze(0),
        "position_ids": torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0),
        "cu_seqlens": torch.tensor([0, *lengths]).cumsum(0).to(torch.int32),
    }
    if "labels" in features[0]:
        batch["labels"] = torch.tensor([f["labels"] for f in features])
    return batch


def padding_share(lengths: Sequence[int], batches: Iterable[Sequence[int]], multiple: int = 1) -> float:
    """The share of pad tokens in right-padded batches (each row padded to its batch's longest, rounded up to
    ``multiple``): the tokens, and the FLOPs on them, that packing leaves out."""
    real = padded = 0
    for b in batches:
        width = -(-max(lengths[i] for i in b) // multiple) * multiple
        real, padded = real + sum(lengths[i] for i in b), padded + width * len(b)
    return 1 - real / padded if padded else 0.0


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
    train = DataLoader(data.train, batch_sampler=sampler, **loader_args(data.train_collate or data.collate, hardware))
    val = eval_loader(data.val, data.val_lengths, data.collate, batch_size=trainer.eval_batch_size, hardware=hardware)
    return train, val, accum


def padding_shares(data: TaskData, train: DataLoader, val: DataLoader) -> dict[str, float]:
    """``{"train", "val"}``: the share of pad tokens in this rank's first-epoch train batches and in the val
    batches, padded as ``data.collate`` pads (its ``pad_to_multiple_of``); ``{}`` when the data has no lengths."""
    if data.train_lengths is None or data.val_lengths is None or val.batch_size is None:
        return {}
    multiple = getattr(data.collate, "pad_to_multiple_of", None) or 1
    order, size = list(val.sampler), val.batch_size
    return {
        "train": padding_share(
            data.train_lengths, cast(EpochBatchSampler, train.batch_sampler).epoch_batches(1), multiple
        ),
        "val": padding_share(data.val_lengths, [order[s : s + size] for s in range(0, len(order), size)], multiple),
    }


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
