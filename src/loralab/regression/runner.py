"""Dispatch of the regression tasks, with the same run lifecycle as classification: validate the config before
anything loads, one MLflow run, always ended (FINISHED, FAILED or KILLED)."""

from __future__ import annotations

import contextlib
import importlib
import logging
import signal
import threading
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from loralab.reporting import console
from loralab.tracking import sweep
from loralab.config import ConfigError
from loralab.core.memory import resolve_auto
from loralab.regression.config import validate_tabular, validate_text
from loralab.run import hydra_tags, provenance

log = logging.getLogger(__name__)

# cfg.task.name -> (config rules, module whose run(cfg, out_dir, tracker) trains it)
TASKS = {
    "tabular_regression": (validate_tabular, "loralab.regression.marketsentinel"),
    "text_regression": (validate_text, "loralab.regression.article"),
}


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Intra-op threads for this run only (``hardware.torch_threads``; null keeps torch's default). Small models
    gain nothing from more threads and, on a busy CPU, their synchronisation costs more than the maths: measured
    0.75 vs 32 ms per MLP step and 0.14-0.22 vs 0.8-1.8 s per tiny-Qwen2 step, 1 vs 2 threads on a loaded host."""
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a scheduler's stop) ends the run like Ctrl-C: MLflow KILLED, not left RUNNING. Regression keeps
    only the best model (by spec), so there is no mid-run state to save."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def train(cfg: DictConfig) -> float:
    """Run one regression experiment; returns ``cfg.objective`` of the best epoch (what sweepers optimise)."""
    if cfg.task.name not in TASKS:
        raise ConfigError(f"task={cfg.task.name!r}: must be classification or one of {sorted(TASKS)}")
    if cfg.get("resume"):
        raise ConfigError(f"resume={cfg.resume!r}: regression experiments keep only their best model, so they "
                          "cannot resume; start a new run")
    with open_dict(cfg):
        cfg.hardware = resolve_auto(OmegaConf.to_container(cfg.hardware, resolve=True))
    validate, module = TASKS[cfg.task.name]
    validate(cfg)  # before any data or model is loaded
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tracker = instantiate(cfg.tracking)
    parent_run_id, sweep_tags = sweep.job_context(tracker)  # (None, {}) outside -m
    tracker.start(OmegaConf.to_container(cfg, resolve=True),
                  tags={**hydra_tags(), **sweep_tags, **provenance(cfg), "task": cfg.task.name},
                  parent_run_id=parent_run_id)
    with tracker.closing(), torch_threads(cfg.hardware.get("torch_threads")), sigterm_as_interrupt():
        summary = importlib.import_module(module).run(cfg, out_dir, tracker)
    console.print_summary(summary)
    return summary["objective"]
