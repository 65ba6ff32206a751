"""The trainer: an object that holds everything a fit needs (set up ▸ fit ▸ finish), for every task.

Read ``fit`` and ``_train_epoch`` top to bottom: forward ▸ loss ▸ backward ▸ step, evaluate every epoch (and every
``val_check_interval`` steps), stop early or at ``max_steps``. The trainer knows nothing about MLflow, Hydra or what a
task is: it gets a model, a loss, loaders and a metric function, and reports each epoch through ``on_epoch_end`` and
step-level numbers through ``on_step``. All progress lives in ``TrainState``; a checkpoint of it with the weights,
optimizer, scheduler, scaler and RNG states resumes a run exactly, also mid-epoch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, cast

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from loralab.core.checkpoint import Checkpoints
from loralab.core.distributed import Dist
from loralab.core.sampler import EpochBatchSampler
from loralab.core.state import EarlyStopping, TrainState
from loralab.errors import NonFiniteLossError, TrainingInterrupted

if TYPE_CHECKING:  # the schema is a layer above; the trainer only reads attributes of it
    from loralab.config.schema import OptimConf, TrainerConf

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
def predict_logits(
    model: nn.Module, loader: DataLoader, device: torch.device, precision: str = "fp32"
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


def val_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The validation part of an evaluation's metrics (what step-level curves show)."""
    return {k: v for k, v in metrics.items() if k.startswith("val_")}


@dataclass
class FitInputs:
    """What one fit trains: the model (DDP-wrapped under torchrun), its loss, the loaders and how to score."""

    model: nn.Module
    loss_fn: nn.Module
    train_loader: DataLoader  # batch_sampler: an EpochBatchSampler (resumable order)
    val_loader: DataLoader  # this rank's shard under DDP
    metric_fn: Callable[[np.ndarray, np.ndarray], dict[str, float]]
    accum_steps: int = 1


class Trainer:
    """Set up (optimizer, schedule, scaler, resume) ▸ fit (epochs, early stopping, checkpoints) ▸ finish (best
    weights back in the model). ``trainer``/``optim`` are the run's typed groups (``max_epochs`` already a
    number: ``TrainerConf.for_epoch_length``); null step-level knobs (``log_every_n_steps``,
    ``val_check_interval``, ``max_steps``) switch them off."""

    def __init__(
        self,
        trainer: TrainerConf,
        optim: OptimConf,
        *,
        precision: str,
        device: torch.device,
        ddp: Dist = Dist(),
        progress: bool = True,
    ):
        unresolved = [k for k in ("max_epochs", "val_check_interval") if getattr(trainer, k) == "auto"]
        if unresolved:  # they depend on the epoch's length: TrainerConf.for_epoch_length turns them into numbers
            raise ValueError(f"trainer {unresolved} still 'auto': resolve with TrainerConf.for_epoch_length first")
        self.conf, self.optim = trainer, optim
        self.precision, self.device, self.ddp, self.progress = precision, device, ddp, progress
        self.log_every = trainer.log_every_n_steps
        self.val_every = trainer.val_check_interval
        self.max_steps = trainer.max_steps
        self.state = TrainState()
        self.on_step: Callable[[int, dict[str, float]], None] = lambda step, metrics: None

    @property
    def core(self) -> nn.Module:
        """The model without its DDP wrapper (what checkpoints hold)."""
        m = self.inputs.model
        return m.module if isinstance(m, DDP) else m

    def setup(self, inputs: FitInputs, checkpoints: Checkpoints) -> None:
        """Build the optimizer, schedule and grad scaler; restore them (and the loop state) when resuming."""
        # transformers' trainer utilities import peft (~3 s of CPU together): a fit needs them, a prediction
        # (``predict_logits``, which serving and export checks import) does not
        from transformers import get_scheduler

        self.inputs, self.checkpoints = inputs, checkpoints
        params = [p for p in inputs.model.parameters() if p.requires_grad]
        self.optimizer = self.optim.make_optimizer(params)
        steps_per_epoch = -(-len(inputs.train_loader) // inputs.accum_steps)
        total_steps = self.conf.max_epochs * steps_per_epoch
        if self.max_steps:  # the schedule ends where training does
            total_steps = min(total_steps, self.max_steps)
        self.total_steps = total_steps  # the planned length (early stopping may end sooner): the progress bar's ETA
        self.scheduler = get_scheduler(
            self.optim.scheduler,
            self.optimizer,
            num_training_steps=total_steps,
            num_warmup_steps=int(self.optim.warmup_ratio * total_steps),
        )
        self.grace_steps = self.conf.early_stopping.grace * steps_per_epoch  # the stopper weighs evaluations after
        if self.grace_steps:
            log.info(
                "early stopping weighs evaluations after step %d (trainer.early_stopping.grace=%d epochs)",
                self.grace_steps,
                self.conf.early_stopping.grace,
            )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.early_stopping = EarlyStopping(
            self.conf.early_stopping.patience,
            self.conf.early_stopping.min_delta,
            self.conf.monitor_mode,
            self.conf.early_stopping.smoothing,
        )
        parts = dict(model=self.core, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler)
        loop = checkpoints.restore(**parts)
        if loop is not None:
            self.state = TrainState(**loop)
            for key, value in self.state.early_stopping.items():
                setattr(self.early_stopping, key, value)
            log.info("resumed at epoch %d, step %d", self.state.epoch, self.state.step)
        checkpoints.bind(**parts)

    def fit(
        self,
        on_epoch_end: Callable[[TrainState, dict[str, float]], None] = lambda s, m: None,
        stop_requested: Callable[[], bool] = lambda: False,
        on_step: Callable[[int, dict[str, float]], None] = lambda step, m: None,
    ) -> TrainState:
        """Train from ``self.state`` up to ``trainer.max_epochs`` (or ``max_steps``); the evaluation with the best
        ``trainer.monitor`` wins. ``on_epoch_end`` gets each epoch's metrics; ``on_step(step, metrics)`` gets
        step-level ones at optimizer step ``step`` (train numbers every ``log_every_n_steps``, the val metrics of every
        evaluation). Both run before that point's checkpoints are written."""
        self.on_step = on_step
        if self.early_stopping.should_stop or self._max_steps_reached:  # resumed from a run that had stopped
            return self.state
        for epoch in range(self.state.epoch + 1, self.conf.max_epochs + 1):
            if not self._train_epoch(epoch, stop_requested):
                break  # stopped at an evaluation inside the epoch (early stopping, max_steps)
            metrics = self._evaluate(epoch)
            improved, stop = self._judge(metrics, epoch)
            st = self.state
            st.epoch, st.batches_done, st.loss_sum, st.samples, st.train_time_s = epoch, 0, 0.0, 0, 0.0
            st.history.append(metrics)
            log.info(
                "epoch %d: train_loss %.4f  val_loss %.4f  %s %.4f%s",
                epoch,
                metrics["train_loss"],
                metrics["val_loss"],
                self.conf.monitor,
                metrics[self.conf.monitor],
                "  (best)" if improved else "",
            )
            # Report before checkpointing: a crash in between re-runs this epoch on resume (and reports it again),
            # whereas the other order would resume past an epoch whose metrics were never reported. Reporting never
            # raises (the tracker retries, then drops a write it cannot make), so the checkpoint always follows.
            on_step(st.step, val_metrics(metrics))
            on_epoch_end(st, metrics)
            self.checkpoints.epoch_end(st.as_dict(), epoch, metrics[self.conf.monitor])
            if stop:
                break
        return self.state

    @property
    def _max_steps_reached(self) -> bool:
        return self.max_steps is not None and self.state.step >= self.max_steps

    def _judge(self, metrics: dict[str, float], epoch: int) -> tuple[bool, bool]:
        """Weigh an evaluation (of epoch ``epoch``, finished or not): best so far? early stopping? ``max_steps``?
        Returns (improved, stop) and records the verdicts in ``state``."""
        st, monitor, mode = self.state, self.conf.monitor, self.conf.monitor_mode
        earlier = [h[monitor] for h in (*st.history, *st.checks)]
        # Best = best raw value (as the checkpoint ranking sees it); min_delta only decides when patience runs out.
        value = metrics[monitor]
        improved = not earlier or (value > max(earlier) if mode == "max" else value < min(earlier))
        # Early in a run a rare class's F1 can sit flat or swing for epochs while the loss still falls: evaluations
        # in the first grace epochs are ranked and checkpointed but never start the stopper's patience.
        if st.step > self.grace_steps:
            self.early_stopping.update(value)
        st.early_stopping = self.early_stopping.state()
        if improved:
            st.best_epoch, st.best_step = epoch, st.step
        if self.early_stopping.should_stop:
            unit = "evaluations" if self.val_every else "epochs"
            st.stop_reason = f"early_stopping: no {monitor} improvement for {self.conf.early_stopping.patience} {unit}"
        elif self._max_steps_reached:
            st.stop_reason = f"max_steps: {self.max_steps} optimizer steps"
        return improved, self.early_stopping.should_stop or self._max_steps_reached

    def finish(self) -> TrainState:
        """Put the best epoch's weights back into the model: what the rest of the run reports and exports."""
        self.ddp.barrier()  # rank 0's checkpoints are complete
        if self.ddp.is_main:
            self.checkpoints.load_best(self.core)
        return self.state

    def _train_epoch(self, epoch: int, stop_requested: Callable[[], bool]) -> bool:
        """Run the rest of epoch ``epoch`` (from ``state.batches_done``), updating ``state`` as it goes; False when
        training stopped at an evaluation inside it (early stopping at a val check, ``max_steps``).

        Under DDP each rank runs its own shard of batches; gradients are all-reduced once per optimizer step (not per
        micro-batch: ``no_sync``), and a stop request is agreed on by all ranks so none is left waiting. Every rank
        reaches the same log, check and sync points: they depend on the step count only.
        """
        f, st, dev = self.inputs, self.state, self.device
        loader = f.train_loader
        sampler = cast(EpochBatchSampler, loader.batch_sampler)
        sampler.set_epoch(epoch, start_batch=st.batches_done)
        f.model.train()
        n_micro, accum = len(sampler), f.accum_steps
        loss_sum = torch.zeros((), device=dev)  # summed on device: no host sync per step
        self._samples, self._t0, self._skipped_in_a_row = 0, time.perf_counter(), 0
        self._window = (st.loss_sum, st.samples, st.train_time_s)  # where the step-log window starts
        desc = f"epoch {epoch}/{self.conf.max_epochs}"
        # A DataLoader iterator draws its worker seed from the global RNG. Drawn here, that would put a run resumed
        # mid-epoch one draw ahead of the uninterrupted one (dropout masks differ); forked, no run draws at all.
        with torch.random.fork_rng(devices=[]):
            batches = iter(loader)
        bar = tqdm(
            batches,
            desc=desc,
            unit="batch",
            leave=False,
            dynamic_ncols=True,
            initial=st.batches_done,
            total=n_micro,
            disable=None if self.progress else True,
        )  # None: off when not a TTY
        self.optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(bar, start=st.batches_done):
            batch = batch_to(batch, dev)
            y = batch.pop("labels")
            group_start = (i // accum) * accum
            group_size = min(accum, n_micro - group_start)  # the last group may be short
            last_in_group = i - group_start + 1 == group_size
            # DDP all-reduces gradients on every backward unless told not to: only the last micro-batch syncs.
            sync = contextlib.nullcontext() if last_in_group or not self.ddp.enabled else cast(DDP, f.model).no_sync()
            with sync:
                with autocast(dev, self.precision):
                    logits = f.model(**batch).logits
                loss = f.loss_fn(logits, y)
                self.scaler.scale(loss / group_size).backward()
            loss_sum += loss.detach() * y.shape[0]
            self._samples += y.shape[0]
            if not last_in_group:
                continue  # keep accumulating
            log_now = self.log_every is not None and (st.step + 1) % self.log_every == 0
            grad_norm = self._optimizer_step(measure=log_now)
            st.batches_done = i + 1
            epoch_done = st.batches_done == n_micro
            check = not epoch_done and (
                self.val_every is not None and st.step % self.val_every == 0 or self._max_steps_reached
            )  # an epoch's last step: the epoch end evaluates
            at_sync_point = st.step % SYNC_EVERY == 0 or epoch_done or log_now or check
            if at_sync_point:  # the only host syncs: one per SYNC_EVERY steps, plus logs and checks
                self._sync(loss_sum, bar, desc)
            if log_now:
                self._log_step(grad_norm)
            if check and self._check(epoch, n_micro):
                bar.close()
                return False
            stop = stop_requested()
            if self.ddp.enabled:  # agree across ranks, at sync points only, so no rank waits in an all-reduce forever
                stop = at_sync_point and self.ddp.sum(float(stop))[0] > 0
            if stop:
                if not at_sync_point:
                    self._sync(loss_sum, bar, desc)
                self.checkpoints.save_last(st.as_dict())
                raise TrainingInterrupted(
                    f"stopped at step {st.step} (epoch {st.epoch + 1}, batch {st.batches_done}/{n_micro})"
                )
        return True

    def _check(self, epoch: int, n_micro: int) -> bool:
        """Evaluate inside epoch ``epoch`` (a val check, or the step ``max_steps`` stops at), then report, rank and
        checkpoint it as an epoch end would; True when training stops here."""
        st = self.state
        # Forked RNG: evaluating (its loader draws a seed) must not move the stream training draws dropout from, so
        # checks neither change what is trained nor break exact resume from the `last` written here.
        with torch.random.fork_rng(devices=[]):
            metrics = self._evaluate(round(st.epoch + st.batches_done / n_micro, 4))
        self.inputs.model.train()
        improved, stop = self._judge(metrics, epoch)
        st.checks.append(metrics)
        log.info(
            "step %d (epoch %.2f): val_loss %.4f  %s %.4f%s",
            st.step,
            metrics["epoch"],
            metrics["val_loss"],
            self.conf.monitor,
            metrics[self.conf.monitor],
            "  (best)" if improved else "",
        )
        self.on_step(st.step, val_metrics(metrics))  # reported before checkpointing, as at an epoch end
        self.checkpoints.check(st.as_dict(), st.step, epoch, metrics[self.conf.monitor])
        self._t0 = time.perf_counter()  # evaluation is not training time
        return stop

    def _log_step(self, grad_norm: torch.Tensor | None) -> None:
        """Step-level train numbers at this optimizer step: mean loss and samples/s over the steps since the last
        log (or the epoch start; every rank's samples), the lr this step used and its gradient norm (before
        clipping). Called right after a sync, so ``state`` is current."""
        st = self.state
        loss0, samples0, time0 = self._window
        loss_sum, samples = self.ddp.sum(st.loss_sum - loss0, st.samples - samples0)
        metrics = {
            "train_loss": loss_sum / max(samples, 1),
            "lr": self._lr,
            "samples_per_s": samples / max(st.train_time_s - time0, 1e-9),
        }
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm.item()
        self._window = (st.loss_sum, st.samples, st.train_time_s)
        self.on_step(st.step, metrics)

    def _optimizer_step(self, measure: bool = False) -> torch.Tensor | None:
        """Unscale, clip, step (skipped by the scaler on fp16 overflow), schedule. Returns the gradient norm
        (before clipping) when clipping computes it or ``measure`` asks for it, else None (no extra work)."""
        self.scaler.unscale_(self.optimizer)
        self._lr = self.optimizer.param_groups[0]["lr"]  # the lr this step uses (the scheduler moves it after)
        grad_norm = None
        if self.optim.max_grad_norm:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.inputs.model.parameters(), self.optim.max_grad_norm)
        elif measure:
            grad_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self.inputs.model.parameters() if p.grad is not None]
            )
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if scale_before is not None and self.scaler.get_scale() < scale_before:
            self.state.skipped_steps += 1
            self._skipped_in_a_row += 1
            if self._skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                raise NonFiniteLossError(
                    f"{self._skipped_in_a_row} fp16 steps in a row overflowed (loss/gradients "
                    f"non-finite); try precision=bf16 or fp32, or a lower optim.lr"
                )
        else:
            self._skipped_in_a_row = 0
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        return grad_norm

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
        left = (self.total_steps - st.step) * st.train_time_s / max(st.step, 1)  # the whole stage, not this epoch
        bar.set_postfix(
            loss=f"{mean_loss:.4f}",
            lr=f"{self.scheduler.get_last_lr()[0]:.2e}",
            samples_s=f"{st.samples / max(st.train_time_s, 1e-9):.0f}",
            left=f"{left / 60:.0f} min" if left >= 90 else f"{left:.0f} s",
        )

    def _evaluate(self, epoch: float) -> dict[str, float]:
        """Metrics on the whole validation set (every rank's shard gathered); train numbers are of the epoch so
        far. ``epoch`` is fractional for an evaluation inside an epoch."""
        f, st = self.inputs, self.state
        t_eval = time.perf_counter()
        logits, y = self.ddp.gather_predictions(*predict_logits(f.model, f.val_loader, self.device, self.precision))
        val_loss = f.loss_fn(torch.from_numpy(logits).to(self.device), torch.from_numpy(y).to(self.device)).item()
        loss_sum, samples = self.ddp.sum(st.loss_sum, st.samples)  # every rank's share of the epoch
        metrics = {
            "epoch": epoch,
            "step": st.step,
            "train_loss": loss_sum / max(samples, 1),
            "val_loss": val_loss,
            "train_samples_per_s": samples / max(st.train_time_s, 1e-9),
            "epoch_train_time_s": st.train_time_s,
            "eval_samples_per_s": len(logits) / (time.perf_counter() - t_eval),
            "skipped_steps": st.skipped_steps,
            **f.metric_fn(y, logits),
        }
        if self.device.type == "cuda":
            metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        return metrics
