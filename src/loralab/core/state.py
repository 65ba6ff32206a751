"""Where training stands, as plain numbers (so it round-trips through a checkpoint), and the early-stopping rule."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class EarlyStopping:
    """Stop after ``patience`` evaluations (epochs, or val checks with ``trainer.val_check_interval``) without the
    monitored metric improving by more than ``min_delta``.

    With ``smoothing`` > 0 the decision reads an exponential moving average of the evaluations (weight
    ``smoothing`` on the past): a single lucky epoch does not set a bar no later epoch can clear, and a single bad
    one does not count as much as a real decline. Which epoch is best (reloaded, exported) is still the raw value.
    """

    patience: int
    min_delta: float = 0.0
    mode: str = "max"
    smoothing: float = 0.0
    best: float = -math.inf
    bad_epochs: int = 0  # evaluations without improvement (the name predates val checks)
    smoothed: float | None = None

    def update(self, value: float) -> bool:
        """Record an evaluation's value; True when it is a new best (of the smoothed value)."""
        score = value if self.mode == "max" else -value
        if self.smoothed is not None:
            score = self.smoothing * self.smoothed + (1 - self.smoothing) * score
        self.smoothed = score
        if score > self.best + self.min_delta:
            self.best, self.bad_epochs = score, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs > 0 and self.bad_epochs >= self.patience  # patience 0: stop at the first miss

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps to resume the decision exactly."""
        return {"best": self.best, "bad_epochs": self.bad_epochs, "smoothed": self.smoothed}


@dataclass
class TrainState:
    """Where training stands; plain numbers only, so it round-trips through a checkpoint."""

    epoch: int = 0  # completed epochs
    batches_done: int = 0  # micro-batches already run in epoch ``epoch + 1`` (mid-epoch resume)
    step: int = 0  # optimizer steps so far
    loss_sum: float = 0.0  # train loss x samples so far in the unfinished epoch
    samples: int = 0
    train_time_s: float = 0.0  # in the unfinished epoch
    skipped_steps: int = 0  # fp16 overflow steps skipped by the GradScaler
    best_epoch: int | None = None  # the epoch the best evaluation fell in (it may be a val check inside it)
    best_step: int | None = None  # optimizer step of the best evaluation
    stop_reason: str = "max_epochs"
    early_stopping: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # epoch-end evaluations, one per finished epoch
    checks: list[dict[str, Any]] = field(default_factory=list)  # evaluations inside an epoch (val checks, max_steps)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def best(self) -> dict[str, Any]:
        """Every metric of the best evaluation (an epoch end or a val check)."""
        for h in (*self.history, *self.checks):
            if self.best_step is not None and h.get("step") == self.best_step:
                return h
        if self.best_epoch is None:
            raise RuntimeError("no evaluation yet")
        return self.history[self.best_epoch - 1]

    @property
    def _timed(self) -> list[dict[str, Any]]:
        """Evaluations whose timings add up to the whole fit: every epoch end, plus the last check when training
        stopped inside an epoch (its timings cover that epoch so far)."""
        partial = [self.checks[-1]] if self.batches_done and self.checks else []
        return [*self.history, *partial]

    @property
    def fit_time_s(self) -> float:
        """Training time (evaluation excluded)."""
        return sum(h["epoch_train_time_s"] for h in self._timed)

    @property
    def train_samples_per_s(self) -> float:
        return sum(h["train_samples_per_s"] * h["epoch_train_time_s"] for h in self._timed) / max(self.fit_time_s, 1e-9)
