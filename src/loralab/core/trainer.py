"""The trainer: an object that holds everything a fit needs (set up ▸ fit ▸ finish), for every task.

Read ``fit`` and ``_train_epoch`` top to bottom: forward ▸ loss ▸ backward ▸ step, evaluate every epoch, stop early.
The trainer knows nothing about MLflow, Hydra or what a task is: it gets a model, a loss, loaders and a metric
function, and reports each epoch through ``on_epoch_end``. All progress lives in ``TrainState``; a checkpoint of it
with the weights, optimizer, scheduler, scaler and RNG states resumes a run exactly, also mid-epoch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from hydra.utils import instantiate
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from loralab.core.checkpoint import Checkpoints
from loralab.core.distributed import Dist
from loralab.core.state import EarlyStopping, TrainState
from loralab.errors import NonFiniteLossError, TrainingInterrupted

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_SKIPPED_IN_A_ROW = 50  # fp16 overflow steps in a row before the run is declared broken
SYNC_EVERY = 10  # optimizer steps between host syncs (loss readout, progress bar, stop agreement under DDP)


def autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def batch_to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.inference_mode()
def predict_logits(model: nn.Module, loader: DataLoader, device: torch.device, precision: str = "fp32"
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """Outputs (float32) and labels in loader order."""
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


@dataclass
class Fit:
    """What one fit trains: the model (DDP-wrapped under torchrun), its loss, the loaders and how to score."""

    model: nn.Module
    loss_fn: nn.Module
    train_loader: DataLoader          # batch_sampler: an EpochBatchSampler (resumable order)
    val_loader: DataLoader            # this rank's shard under DDP
    metric_fn: Callable[[np.ndarray, np.ndarray], dict[str, float]]
    accum_steps: int = 1


class Trainer:
    """Set up (optimizer, schedule, scaler, resume) ▸ fit (epochs, early stopping, checkpoints) ▸ finish (best
    weights back in the model). ``trainer_cfg``/``optim_cfg`` are the run's ``trainer``/``optim`` groups."""

    def __init__(self, trainer_cfg, optim_cfg, *, precision: str, device: torch.device, ddp: Dist = Dist(),
                 progress: bool = True):
        self.cfg, self.optim_cfg = trainer_cfg, optim_cfg
        self.precision, self.device, self.ddp, self.progress = precision, device, ddp, progress
        self.state = TrainState()

    @property
    def core(self) -> nn.Module:
        """The model without its DDP wrapper (what checkpoints hold)."""
        m = self.fit_.model
        return m.module if isinstance(m, DistributedDataParallel) else m

    def setup(self, fit: Fit, checkpoints: Checkpoints) -> None:
        """Build the optimizer, schedule and grad scaler; restore them (and the loop state) when resuming."""
        self.fit_, self.checkpoints = fit, checkpoints
        params = [p for p in fit.model.parameters() if p.requires_grad]
        self.optimizer = instantiate(self.optim_cfg.optimizer)(params=params)
        total_steps = self.cfg.max_epochs * -(-len(fit.train_loader) // fit.accum_steps)
        self.scheduler = get_scheduler(self.optim_cfg.scheduler, self.optimizer, num_training_steps=total_steps,
                                       num_warmup_steps=int(self.optim_cfg.warmup_ratio * total_steps))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.early_stopping = EarlyStopping(self.cfg.early_stopping.patience, self.cfg.early_stopping.min_delta,
                                            self.cfg.monitor_mode, self.cfg.early_stopping.get("smoothing", 0.0))
        parts = dict(model=self.core, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler)
        loop = checkpoints.restore(**parts)
        if loop is not None:
            self.state = TrainState(**loop)
            for key, value in self.state.early_stopping.items():
                setattr(self.early_stopping, key, value)
            log.info("resumed at epoch %d, step %d", self.state.epoch, self.state.step)
        checkpoints.bind(**parts)

    def fit(self, on_epoch_end: Callable[[TrainState, dict[str, float]], None] = lambda s, m: None,
            stop_requested: Callable[[], bool] = lambda: False) -> TrainState:
        """Train from ``self.state`` up to ``trainer.max_epochs``; the epoch with the best ``trainer.monitor``
        wins. ``on_epoch_end`` (logging) runs just before the epoch's checkpoints are written."""
        monitor, max_epochs = self.cfg.monitor, self.cfg.max_epochs
        if self.early_stopping.should_stop:  # resumed from a run that had already stopped early
            return self.state
        for epoch in range(self.state.epoch + 1, max_epochs + 1):
            self._train_epoch(epoch, stop_requested)
            metrics = self._evaluate(epoch)
            earlier = [h[monitor] for h in self.state.history]
            # Best = best raw value (as the checkpoint ranking sees it); min_delta only decides when patience runs out.
            value = metrics[monitor]
            improved = not earlier or (value > max(earlier) if self.cfg.monitor_mode == "max" else value < min(earlier))
            self.early_stopping.update(value)
            st = self.state
            st.epoch, st.batches_done, st.loss_sum, st.samples, st.train_time_s = epoch, 0, 0.0, 0, 0.0
            st.early_stopping = self.early_stopping.state()
            st.history.append(metrics)
            st.best_epoch = epoch if improved else st.best_epoch
            if self.early_stopping.should_stop:
                st.stop_reason = f"early_stopping: no {monitor} improvement for {self.cfg.early_stopping.patience} epochs"
            log.info("epoch %d: train_loss %.4f  val_loss %.4f  %s %.4f%s", epoch, metrics["train_loss"],
                     metrics["val_loss"], monitor, value, "  (best)" if improved else "")
            # Report before checkpointing: a crash in between re-runs this epoch on resume (and reports it again),
            # whereas the other order would resume past an epoch whose metrics were never reported.
            on_epoch_end(st, metrics)
            self.checkpoints.epoch_end(st.as_dict(), epoch, value)
            if self.early_stopping.should_stop:
                break
        return self.state

    def finish(self) -> TrainState:
        """Put the best epoch's weights back into the model: what the rest of the run reports and exports."""
        self.ddp.barrier()  # rank 0's checkpoints are complete
        if self.ddp.is_main:
            self.checkpoints.load_best(self.core)
        return self.state

    def _train_epoch(self, epoch: int, stop_requested: Callable[[], bool]) -> None:
        """Run the rest of epoch ``epoch`` (from ``state.batches_done``), updating ``state`` as it goes.

        Under DDP each rank runs its own shard of batches; gradients are all-reduced once per optimizer step (not per
        micro-batch: ``no_sync``), and a stop request is agreed on by all ranks so none is left waiting.
        """
        f, st, dev = self.fit_, self.state, self.device
        loader = f.train_loader
        loader.batch_sampler.set_epoch(epoch, start_batch=st.batches_done)
        f.model.train()
        n_micro, accum = len(loader.batch_sampler), f.accum_steps
        loss_sum = torch.zeros((), device=dev)  # summed on device: no host sync per step
        self._samples, self._t0, self._skipped_in_a_row = 0, time.perf_counter(), 0
        desc = f"epoch {epoch}/{self.cfg.max_epochs}"
        bar = tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True, initial=st.batches_done,
                   total=n_micro, disable=None if self.progress else True)  # None: off when not a TTY
        self.optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(bar, start=st.batches_done):
            batch = batch_to(batch, dev)
            y = batch.pop("labels")
            group_start = (i // accum) * accum
            group_size = min(accum, n_micro - group_start)  # the last group may be short
            last_in_group = i - group_start + 1 == group_size
            # DDP all-reduces gradients on every backward unless told not to: only the last micro-batch syncs.
            sync = contextlib.nullcontext() if last_in_group or not self.ddp.enabled else f.model.no_sync()
            with sync:
                with autocast(dev, self.precision):
                    logits = f.model(**batch).logits
                loss = f.loss_fn(logits, y)
                self.scaler.scale(loss / group_size).backward()
            loss_sum += loss.detach() * y.shape[0]
            self._samples += y.shape[0]
            if not last_in_group:
                continue  # keep accumulating
            self._optimizer_step()
            st.batches_done = i + 1
            at_sync_point = st.step % SYNC_EVERY == 0 or st.batches_done == n_micro
            if at_sync_point:  # the only host syncs: one per SYNC_EVERY steps
                self._sync(loss_sum, bar, desc)
            stop = stop_requested()
            if self.ddp.enabled:  # agree across ranks, at sync points only, so no rank waits in an all-reduce forever
                stop = at_sync_point and self.ddp.sum(float(stop))[0] > 0
            if stop:
                if not at_sync_point:
                    self._sync(loss_sum, bar, desc)
                self.checkpoints.save_last(st.as_dict())
                raise TrainingInterrupted(f"stopped at step {st.step} (epoch {st.epoch + 1}, "
                                          f"batch {st.batches_done}/{n_micro})")

    def _optimizer_step(self) -> None:
        """Unscale, clip, step (skipped by the scaler on fp16 overflow), schedule."""
        self.scaler.unscale_(self.optimizer)
        if self.optim_cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.fit_.model.parameters(), self.optim_cfg.max_grad_norm)
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if scale_before is not None and self.scaler.get_scale() < scale_before:
            self.state.skipped_steps += 1
            self._skipped_in_a_row += 1
            if self._skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                raise NonFiniteLossError(f"{self._skipped_in_a_row} fp16 steps in a row overflowed (loss/gradients "
                                         f"non-finite); try precision=bf16 or fp32, or a lower optim.lr")
        else:
            self._skipped_in_a_row = 0
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1

    def _sync(self, loss_sum: torch.Tensor, bar, desc: str) -> None:
        """Move the on-device loss sum and the sample/time counters into ``state``; check the loss is finite."""
        st = self.state
        st.loss_sum += loss_sum.item()  # this is a CPU-GPU sync point
        st.samples += self._samples
        st.train_time_s += time.perf_counter() - self._t0
        loss_sum.zero_()
        self._samples, self._t0 = 0, time.perf_counter()
        mean_loss = st.loss_sum / max(st.samples, 1)
        if not math.isfinite(mean_loss) and not self.scaler.is_enabled():
            raise NonFiniteLossError(f"training loss became {mean_loss} by step {st.step} ({desc})")
        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}",
                        samples_s=f"{st.samples / max(st.train_time_s, 1e-9):.0f}")

    def _evaluate(self, epoch: int) -> dict[str, float]:
        """The epoch's metrics on the whole validation set (every rank's shard gathered)."""
        f, st = self.fit_, self.state
        t_eval = time.perf_counter()
        logits, y = self.ddp.gather_predictions(*predict_logits(f.model, f.val_loader, self.device, self.precision))
        val_loss = f.loss_fn(torch.from_numpy(logits).to(self.device), torch.from_numpy(y).to(self.device)).item()
        loss_sum, samples = self.ddp.sum(st.loss_sum, st.samples)  # every rank's share of the epoch
        metrics = {"epoch": epoch, "train_loss": loss_sum / max(samples, 1), "val_loss": val_loss,
                   "train_samples_per_s": samples / max(st.train_time_s, 1e-9),
                   "epoch_train_time_s": st.train_time_s,
                   "eval_samples_per_s": len(logits) / (time.perf_counter() - t_eval),
                   "skipped_steps": st.skipped_steps, **f.metric_fn(y, logits)}
        if self.device.type == "cuda":
            metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        return metrics
