"""What a run hands back (``RunResult``): the best evaluation, why training stopped, its history and timings, the
data it read, and, once the task finalized it, the final metrics, artifacts and MLflow model. Reporting, tracking
and the CLIs read it as attributes; ``training_summary.json`` is its training part."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunResult:
    task: str
    objective_key: str  # the monitored metric (``objective``), e.g. val_macro_f1
    objective: float  # its value at the best evaluation
    best_epoch: int  # the epoch of the best evaluation (an epoch end or a val check inside it)
    best_step: int  # the optimizer step it was taken at
    best: dict[str, Any]  # every metric of the best evaluation
    stop_reason: str
    epochs_run: int
    history: list[dict[str, Any]]  # one evaluation per finished epoch
    val_checks: list[dict[str, Any]]  # evaluations inside epochs (trainer.val_check_interval)
    wall_time_s: float
    fit_time_s: float
    train_samples_per_s: float
    optimizer_steps: int
    skipped_steps: int
    accumulation_steps: int
    max_epochs: int
    device: str
    world_size: int
    resumed_from: str | None
    provenance: dict[str, str]  # code version, packages, data file hashes
    # The share of pad tokens in padded batches ({"train": first epoch, "val"}; text tasks): what hardware.packing
    # leaves out of training (packing: true) or would (false).
    padding_share: dict[str, float] = field(default_factory=dict)
    packing: bool = False
    # Set once the task has finalized the run (rank 0):
    metrics: dict[str, Any] = field(default_factory=dict)  # the final report: per class, calibration, baseline...
    artifacts: list[str] = field(default_factory=list)
    model_uri: str | None = None
    run_dir: str = ""
    run_id: str | None = None
    tracking_uri: str | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)  # data, pretrain, model, fit, finalize

    FINAL = ("metrics", "artifacts", "model_uri", "run_dir", "run_id", "tracking_uri", "stage_seconds")

    def stage_line(self) -> str:
        """Where the wall went, e.g. ``data 4 s (3%) · pretrain 0 s · fit 96 s (80%) · finalize 15 s (12%)``."""
        total = max(self.wall_time_s, 1e-9)
        return " · ".join(f"{k} {v:.0f} s ({100 * v / total:.0f}%)" for k, v in self.stage_seconds.items())

    def training_summary(self) -> dict[str, Any]:
        """The training part (``training_summary.json``): everything but what finalizing adds."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self.FINAL}

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
