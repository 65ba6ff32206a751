"""Dispatch of the regression tasks, with the same run lifecycle as classification: validate the config before
anything loads, one MLflow run, always ended (FINISHED, FAILED or KILLED)."""

from __future__ import annotations

import importlib
import logging
import platform
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from loralab import console
from loralab.config import ConfigError
from loralab.regression.config import validate_tabular, validate_text
from loralab.run import git_state, hydra_tags

log = logging.getLogger(__name__)

# cfg.task -> (config rules, module whose run(cfg, out_dir, tracker) trains it)
TASKS = {
    "tabular_regression": (validate_tabular, "loralab.regression.marketsentinel"),
    "text_regression": (validate_text, "loralab.regression.article"),
}


def train(cfg: DictConfig) -> float:
    """Run one regression experiment; returns ``cfg.objective`` of the best epoch (what sweepers optimise)."""
    if cfg.task not in TASKS:
        raise ConfigError(f"task={cfg.task!r}: must be classification or one of {sorted(TASKS)}")
    validate, module = TASKS[cfg.task]
    validate(cfg)  # before any data or model is loaded
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tracker = instantiate(cfg.tracking)
    tracker.start(OmegaConf.to_container(cfg, resolve=True),
                  tags={**hydra_tags(), **git_state(cfg.paths.root_dir), "host": platform.node(), "task": cfg.task})
    status = "FAILED"
    try:
        summary = importlib.import_module(module).run(cfg, out_dir, tracker)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.end(status)
    console.print_summary(summary)
    return summary["objective"]
