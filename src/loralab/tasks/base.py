"""The task protocol: what differs between experiments. Everything else (validation, tracking, resume, signals,
top-k checkpoints, DDP, sweeps, provenance, the memory preflight) is the lifecycle's, so every task gets it.

A task is one module: a ``Task`` subclass (with its root schema, metric names, rules and how its MLflow model is
logged) and one YAML naming it (``conf/task/<name>.yaml``, or an experiment that sets ``task``).

The lifecycle calls, in order: ``build_data`` ▸ (the pretrain stage, which may ask for ``pretrain_texts`` and
replace ``source``) ▸ ``build_model`` ▸ ``loss`` ▸ (the trainer fits, scoring each epoch
with ``metrics``) ▸ ``finalize``. ``conf/task/<name>.yaml`` names the class (``_target_``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from loralab.config import RunConf
from loralab.core.distributed import Dist
from loralab.core.loaders import TaskData
from loralab.errors import ConfigError
from loralab.metrics import MetricNames
from loralab.result import RunResult


@dataclass
class RunContext:
    """What the lifecycle hands a task: where to write, what to run on, whom to report to."""

    out_dir: Path
    device: torch.device
    tracker: Any  # loralab.tracking.mlflow.MLflowTracker (disabled on DDP ranks > 0)
    ddp: Dist = field(default_factory=Dist)
    resume_dir: Path | None = None  # the checkpoint this run continues (its tokenizer is reused)


@dataclass
class Finalized:
    """What a task's ``finalize`` adds to the run's result."""

    metrics: dict[str, Any]  # the final report (metrics.json)
    artifacts: list[Path] = field(default_factory=list)  # files in the run dir to log to MLflow
    model_uri: str | None = None  # the logged MLflow model


class Task(ABC):
    """One kind of experiment, built from the run's typed config. The class is also what ``config.check`` asks
    about the task before anything loads: its root schema (``schema``), the names of its metrics, whether it
    reads text (``pretrain``) or blends with a baseline (``ensemble``), and its own cross-field rules."""

    name: ClassVar[str]  # conf/task/<name>.yaml: task.name; tags, reports and exports carry it
    schema: ClassVar[type[RunConf]]  # the root schema: which data, model and loss groups a run of it takes
    reads_text: ClassVar[bool] = False  # records become text a language model reads: pretrain=clm applies
    blends: ClassVar[bool] = False  # outputs are class probabilities: ensemble=blend applies
    tokenizer: Any = None  # saved into every checkpoint when set: a resumed run must tokenize identically
    source: Any = None  # loralab.models.build.ModelSource of a text task, set by build_data; the lifecycle's
    # pretrain stage may replace it (a base it pretrained) before build_model loads it

    def __init__(self, conf: RunConf, ctx: RunContext):
        self.conf, self.ctx = conf, ctx

    @classmethod
    @abstractmethod
    def metric_names(cls, cfg: DictConfig) -> MetricNames:
        """The ``val_*`` names ``metrics`` will report for this config: ``trainer.monitor`` must be one."""

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        """Rules between this task's own keys (``config/cross.py`` holds those of every task); each failure is one
        ``ConfigError`` line (``config.cross.require``). ``cfg``: the checked config, typed by ``schema``. The
        default: no rules of its own."""
        return None  # an optional hook: not abstract

    @abstractmethod
    def build_data(self) -> TaskData:
        """Read, validate and split the data (drops counted), write ``data_report.json``; datasets ready to batch."""

    def pretrain_texts(self, splits: Sequence[str], extra_files: Sequence[str]) -> list[str]:
        """Unlabelled texts for the pretrain stage, serialized as the model will read them: those of ``splits``
        (``train``, ``val``) and of the records in ``extra_files``. After ``build_data``."""
        raise ConfigError(f"pretrain: task {self.name} has no texts to pretrain on; use pretrain=none")

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The model on ``ctx.device`` (LoRA-wrapped where configured); its outputs come as ``.logits``."""

    @abstractmethod
    def loss(self) -> nn.Module:
        """``loss(outputs, targets)``, on ``ctx.device``."""

    @abstractmethod
    def metrics(self, y: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
        """Scalar validation metrics of one epoch (``val_*``); the monitored one must be among them."""

    @abstractmethod
    def finalize(self, model: nn.Module, val_loader: DataLoader, result: RunResult) -> Finalized:
        """After training, on rank 0 with the best evaluation's weights in ``model``: reports, export, the MLflow
        model. ``result`` holds the training part (history, best evaluation, timings, provenance)."""
