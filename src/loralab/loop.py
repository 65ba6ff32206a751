"""The training loop: forward ▸ loss ▸ backward ▸ step, then evaluate every epoch and stop early.

Read top to bottom. Everything that varies by run (what to log, where to save) arrives as a callback, so the
loop itself knows nothing about MLflow, Hydra or files.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from loralab.data.text import batch_to

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """Training produced NaN/Inf; continuing would only write garbage."""


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
        return self.bad_epochs >= self.patience


@dataclass
class FitResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    best_state: dict[str, torch.Tensor] | None = None
    stop_reason: str = "max_epochs"
    wall_time_s: float = 0.0
    train_samples_per_s: float = 0.0


def autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the weights that training changes (LoRA + head, or everything for full fine-tuning)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if k in names}


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


def train_one_epoch(model, loss_fn, optimizer, scheduler, loader, *, device, precision, accum_steps,
                    max_grad_norm, scaler, desc: str, progress: bool = True) -> dict[str, float]:
    model.train()
    n_micro = len(loader)
    loss_sum = torch.zeros((), device=device)  # summed on device: no host sync per step
    samples, t0 = 0, time.perf_counter()
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True,
               disable=None if progress else True)  # None: off when not a TTY; progress=False: quiet sweeps
    optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(bar):
        batch = batch_to(batch, device)
        y = batch.pop("labels")
        group_start = (i // accum_steps) * accum_steps
        group_size = min(accum_steps, n_micro - group_start)  # the last group may be short
        with autocast(device, precision):
            logits = model(**batch).logits
        loss = loss_fn(logits, y)
        scaler.scale(loss / group_size).backward()
        loss_sum += loss.detach() * y.shape[0]
        samples += y.shape[0]
        if i - group_start + 1 == group_size:  # end of an accumulation group: one optimizer step
            scaler.unscale_(optimizer)
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if i % 10 == 0 or i == n_micro - 1:  # the only host syncs: one per 10 batches
            mean_loss = (loss_sum / samples).item()
            if not math.isfinite(mean_loss):
                raise NonFiniteLossError(f"training loss became {mean_loss} at batch {i} ({desc})")
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                            samples_s=f"{samples / (time.perf_counter() - t0):.0f}")
    elapsed = time.perf_counter() - t0
    return {"train_loss": (loss_sum / max(samples, 1)).item(), "train_samples_per_s": samples / elapsed,
            "epoch_time_s": elapsed}


def fit(model: nn.Module, loss_fn: nn.Module, optimizer, scheduler, train_loader: DataLoader,
        val_loader: DataLoader, *, metric_fn: Callable[[np.ndarray, np.ndarray], dict[str, float]],
        max_epochs: int, early_stopping: EarlyStopping, monitor: str, device: torch.device,
        precision: str = "fp32", accum_steps: int = 1, max_grad_norm: float | None = 1.0,
        on_epoch_end: Callable[[int, dict[str, float], bool], None] | None = None, progress: bool = True
        ) -> FitResult:
    """Train up to ``max_epochs``; keep the weights of the epoch with the best ``monitor`` value.

    ``metric_fn(y_true, logits)`` returns the scalar metrics of an epoch (classification or regression).
    """
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    result = FitResult()
    t0 = time.perf_counter()
    for epoch in range(1, max_epochs + 1):
        stats = train_one_epoch(model, loss_fn, optimizer, scheduler, train_loader, device=device,
                                precision=precision, accum_steps=accum_steps, max_grad_norm=max_grad_norm,
                                scaler=scaler, desc=f"epoch {epoch}/{max_epochs}", progress=progress)
        logits, y = predict_logits(model, val_loader, device, precision)
        with torch.no_grad():
            val_loss = loss_fn(torch.from_numpy(logits), torch.from_numpy(y)).item()
        metrics = {"epoch": epoch, **stats, "val_loss": val_loss, **metric_fn(y, logits)}
        improved = early_stopping.update(metrics[monitor])
        if improved:
            result.best_epoch, result.best_state = epoch, trainable_state(model)
        result.history.append(metrics)
        log.info("epoch %d: train_loss %.4f  val_loss %.4f  %s %.4f%s", epoch, stats["train_loss"], val_loss,
                 monitor, metrics[monitor], "  (best)" if improved else "")
        if on_epoch_end:
            on_epoch_end(epoch, metrics, improved)
        if early_stopping.should_stop:
            result.stop_reason = f"early_stopping: no {monitor} improvement for {early_stopping.patience} epochs"
            break
    result.wall_time_s = time.perf_counter() - t0
    total_samples = sum(h["train_samples_per_s"] * h["epoch_time_s"] for h in result.history)
    result.train_samples_per_s = total_samples / max(sum(h["epoch_time_s"] for h in result.history), 1e-9)
    return result
