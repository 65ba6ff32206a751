"""torch.distributed under torchrun: who this process is, and the few collectives the run needs.

``torchrun --nproc_per_node=N train.py ...`` sets RANK/WORLD_SIZE/LOCAL_RANK; without them everything here is a
no-op, so single-process runs pay nothing. The training itself uses ``DistributedDataParallel``.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's value on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_predictions(self, logits: np.ndarray, labels: np.ndarray | None):
        """Concatenate every rank's shard so metrics (and early stopping) see the whole validation set."""
        if not self.enabled:
            return logits, labels
        parts: list = [None] * self.world_size
        dist.all_gather_object(parts, (logits, labels))
        y = [p[1] for p in parts]
        return np.concatenate([p[0] for p in parts]), (None if y[0] is None else np.concatenate(y))

    def sum(self, *values: float) -> list[float]:
        if not self.enabled:
            return list(values)
        nccl_only = dist.get_backend() == "nccl"  # "auto" also gives gloo for CPU tensors; plain nccl does not
        device = torch.device("cuda", self.local_rank) if nccl_only else torch.device("cpu")
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.cpu().tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init(backend: str = "auto", timeout_min: int = 30) -> Dist:
    """Join the process group torchrun describes; a plain ``python train.py`` gets a single-process ``Dist``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if backend == "auto":
            backend = "cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_min))
    log.info("distributed: rank %d of %d (local rank %d, backend %s)", rank, world, local, dist.get_backend())
    return Dist(rank=rank, world_size=world, local_rank=local)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
