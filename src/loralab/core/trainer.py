"""The training loop: forward ▸ loss ▸ backward ▸ step, then evaluate every epoch and stop early.

Read top to bottom. Everything that varies by run (what to log, where to save) arrives as a callback, so the loop
knows nothing about MLflow, Hydra or files. All progress lives in ``TrainState``: saving it with the weights,
optimizer, scheduler and RNG states is enough to resume exactly, also in the middle of an epoch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from loralab.core.distributed import Dist
from loralab.data.text import batch_to
from loralab.errors import NonFiniteLossError, TrainingInterrupted

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_SKIPPED_IN_A_ROW = 50  # fp16 overflow steps in a row before the run is declared broken


@dataclass
class EarlyStopping:
    """Stop after ``patience`` epochs without the monitored metric improving by more than ``min_delta``."""

    patience: int
    min_delta: float = 0.0
    mode: str = "max"
    best: float = -math.inf
    bad_epochs: int = 0

    def update(self, value: float) -> bool:
        """Record an epoch's value; True when it is a new best."""
        score = value if self.mode == "max" else -value
        if score > self.best + self.min_delta:
            self.best, self.bad_epochs = score, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs > 0 and self.bad_epochs >= self.patience  # patience 0: stop at the first miss


@dataclass
class TrainState:
    """Where training stands; plain numbers only, so it round-trips through a checkpoint."""

    epoch: int = 0                 # completed epochs
    batches_done: int = 0          # micro-batches already run in epoch ``epoch + 1`` (mid-epoch resume)
    step: int = 0                  # optimizer steps so far
    loss_sum: float = 0.0          # train loss x samples so far in the unfinished epoch
    samples: int = 0
    train_time_s: float = 0.0      # in the unfinished epoch
    skipped_steps: int = 0         # fp16 overflow steps skipped by the GradScaler
    best_epoch: int | None = None
    stop_reason: str = "max_epochs"
    early_stopping: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def fit_time_s(self) -> float:
        """Training time of the finished epochs (evaluation excluded)."""
        return sum(h["epoch_train_time_s"] for h in self.history)

    @property
    def train_samples_per_s(self) -> float:
        return sum(h["train_samples_per_s"] * h["epoch_train_time_s"] for h in self.history) / max(self.fit_time_s, 1e-9)


def autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.inference_mode()
def predict_logits(model: nn.Module, loader: DataLoader, device: torch.device, precision: str = "fp32"
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits (float32) and labels in loader order."""
    model.eval()
    logits, labels = [], []
    for batch in loader:
        batch = batch_to(batch, device)
        y = batch.pop("labels", None)
        with autocast(device, precision):
            out = model(**batch).logits
        logits.append(out.float())
        if y is not None:
            labels.append(y)
    y_all = torch.cat(labels).cpu().numpy() if labels else None
    return torch.cat(logits).cpu().numpy(), y_all


def train_one_epoch(model, loss_fn, optimizer, scheduler, scaler, loader, state: TrainState, *, device,
                    precision, accum_steps, max_grad_norm, stop_requested: Callable[[], bool],
                    on_interrupt: Callable[[TrainState], None], desc: str, ddp: Dist = Dist(),
                    progress: bool = True) -> None:
    """Run the rest of the current epoch (from ``state.batches_done``), updating ``state`` as it goes.

    Under DDP each rank runs its own shard of batches; gradients are all-reduced once per optimizer step (not per
    micro-batch: ``no_sync``), and a stop request is agreed on by all ranks so none is left waiting.
    """
    model.train()
    n_micro = loader.batch_sampler.__len__()
    loss_sum = torch.zeros((), device=device)  # summed on device: no host sync per step
    samples, t0 = 0, time.perf_counter()
    skipped_in_a_row = 0

    def sync_state() -> None:
        state.loss_sum += loss_sum.item()
        state.samples += samples
        state.train_time_s += time.perf_counter() - t0
        loss_sum.zero_()

    bar = tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True, initial=state.batches_done,
               total=n_micro, disable=None if progress else True)  # None: off when not a TTY; False: quiet sweeps
    optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(bar, start=state.batches_done):
        batch = batch_to(batch, device)
        y = batch.pop("labels")
        group_start = (i // accum_steps) * accum_steps
        group_size = min(accum_steps, n_micro - group_start)  # the last group may be short
        last_in_group = i - group_start + 1 == group_size
        sync = contextlib.nullcontext() if last_in_group or not ddp.enabled else model.no_sync()
        with sync:
            with autocast(device, precision):
                logits = model(**batch).logits
            loss = loss_fn(logits, y)
            scaler.scale(loss / group_size).backward()
        loss_sum += loss.detach() * y.shape[0]
        samples += y.shape[0]
        if not last_in_group:
            continue  # keep accumulating
        # --- end of an accumulation group: one optimizer step ---
        scaler.unscale_(optimizer)
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        scale_before = scaler.get_scale() if scaler.is_enabled() else None
        scaler.step(optimizer)  # skips the step itself when fp16 gradients overflowed
        scaler.update()
        if scale_before is not None and scaler.get_scale() < scale_before:
            state.skipped_steps += 1
            skipped_in_a_row += 1
            if skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                raise NonFiniteLossError(f"{skipped_in_a_row} fp16 steps in a row overflowed (loss/gradients "
                                         f"non-finite); try precision=bf16 or fp32, or a lower optim.lr")
        else:
            skipped_in_a_row = 0
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.batches_done = i + 1
        at_sync_point = state.step % 10 == 0 or state.batches_done == n_micro
        if at_sync_point:  # the only host syncs: one per 10 steps
            sync_state()
            samples, t0 = 0, time.perf_counter()
            mean_loss = state.loss_sum / max(state.samples, 1)
            if not math.isfinite(mean_loss) and not scaler.is_enabled():
                raise NonFiniteLossError(f"training loss became {mean_loss} by step {state.step} ({desc})")
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                            samples_s=f"{state.samples / max(state.train_time_s, 1e-9):.0f}")
        stop = stop_requested()
        if ddp.enabled:  # agree across ranks, at sync points only, so no rank waits in an all-reduce forever
            stop = at_sync_point and ddp.sum(float(stop))[0] > 0
        if stop:
            if not at_sync_point:
                sync_state()
            on_interrupt(state)
            raise TrainingInterrupted(f"stopped at step {state.step} (epoch {state.epoch + 1}, "
                                      f"batch {state.batches_done}/{n_micro})")


def fit(model: nn.Module, loss_fn: nn.Module, optimizer, scheduler, scaler, train_loader: DataLoader,
        val_loader: DataLoader, state: TrainState, *,
        metric_fn: Callable[[np.ndarray, np.ndarray], dict[str, float]], max_epochs: int,
        early_stopping: EarlyStopping, monitor: str, device: torch.device, precision: str = "fp32",
        accum_steps: int = 1, max_grad_norm: float | None = 1.0,
        on_epoch_end: Callable[[TrainState, dict[str, float], bool], None] = lambda *a: None,
        on_interrupt: Callable[[TrainState], None] = lambda s: None,
        stop_requested: Callable[[], bool] = lambda: False, ddp: Dist = Dist(), progress: bool = True) -> TrainState:
    """Train from ``state`` up to ``max_epochs``; track the epoch with the best ``monitor`` value.

    ``metric_fn(y_true, logits)`` returns the scalar metrics of an epoch (classification or regression).
    ``on_epoch_end`` is where the caller logs and checkpoints; it runs after ``state`` is updated.
    """
    for key, value in state.early_stopping.items():
        setattr(early_stopping, key, value)
    if early_stopping.should_stop:  # resumed from a run that had already stopped early
        return state
    for epoch in range(state.epoch + 1, max_epochs + 1):
        train_loader.batch_sampler.set_epoch(epoch, start_batch=state.batches_done)
        train_one_epoch(model, loss_fn, optimizer, scheduler, scaler, train_loader, state, device=device,
                        precision=precision, accum_steps=accum_steps, max_grad_norm=max_grad_norm,
                        stop_requested=stop_requested, on_interrupt=on_interrupt,
                        desc=f"epoch {epoch}/{max_epochs}", ddp=ddp, progress=progress)
        t_eval = time.perf_counter()
        logits, y = ddp.gather_predictions(*predict_logits(model, val_loader, device, precision))
        val_loss = loss_fn(torch.from_numpy(logits), torch.from_numpy(y)).item()
        loss_sum, samples = ddp.sum(state.loss_sum, state.samples)  # every rank's share of the epoch
        metrics = {"epoch": epoch, "train_loss": loss_sum / max(samples, 1), "val_loss": val_loss,
                   "train_samples_per_s": samples / max(state.train_time_s, 1e-9),
                   "epoch_train_time_s": state.train_time_s,
                   "eval_samples_per_s": len(logits) / (time.perf_counter() - t_eval),
                   "skipped_steps": state.skipped_steps, **metric_fn(y, logits)}
        if device.type == "cuda":
            metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        value = metrics[monitor]
        earlier = [h[monitor] for h in state.history]
        # Best = best raw value (as the checkpoint ranking sees it); min_delta only decides when patience runs out.
        improved = not earlier or (value > max(earlier) if early_stopping.mode == "max" else value < min(earlier))
        early_stopping.update(value)
        state.epoch, state.batches_done, state.loss_sum, state.samples, state.train_time_s = epoch, 0, 0.0, 0, 0.0
        state.early_stopping = {"best": early_stopping.best, "bad_epochs": early_stopping.bad_epochs}
        state.history.append(metrics)
        if improved:
            state.best_epoch = epoch
        if early_stopping.should_stop:
            state.stop_reason = f"early_stopping: no {monitor} improvement for {early_stopping.patience} epochs"
        log.info("epoch %d: train_loss %.4f  val_loss %.4f  %s %.4f%s", epoch, metrics["train_loss"], val_loss,
                 monitor, metrics[monitor], "  (best)" if improved else "")
        on_epoch_end(state, metrics, improved)
        if early_stopping.should_stop:
            break
    return state
