"""Resuming a run: which checkpoint (``resume=auto|<dir>``), which MLflow run it belongs to, and what changed since
it was written (config and data hashes) — refused in one line unless ``resume_allow_changes`` accepts it."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from loralab.config import RunConf
from loralab.config.changes import RESUME_IGNORED, changed, describe, flatten, refused
from loralab.core.checkpoint import checkpoint_meta
from loralab.errors import CheckpointError, ConfigError
from loralab.fs import recover, sha256_file

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"  # the config the run used (auto values resolved), in the run dir and on MLflow


def resolve_resume(resume: str | None, out_dir: Path) -> Path | None:
    """``auto``: this run dir's ``checkpoints/last`` if there is one; a path: that checkpoint; None: fresh."""
    if not resume:
        return None
    path = out_dir / "checkpoints" / "last" if resume == "auto" else Path(resume)
    recover(path)
    if path.is_dir():
        return path
    if resume == "auto":
        log.info("resume=auto: no checkpoint in %s, starting fresh", out_dir / "checkpoints")
        return None
    raise ConfigError(f"resume={resume!r}: checkpoint directory not found")


def data_hashes(data_files: dict[str, Any]) -> dict[str, str]:
    """``{"data.train_file.sha256": hex, ...}`` for the data files that exist (the keys provenance tags use)."""
    return {
        f"data.{key}.sha256": sha256_file(path) for key, path in data_files.items() if path and Path(path).is_file()
    }


def checkpoint_run_id(resume_dir: Path | None) -> str | None:
    """The MLflow run a checkpoint belongs to; None for a fresh run, or when the checkpoint is unreadable (the
    check inside the tracked run then fails that run with the reason)."""
    if resume_dir is None:
        return None
    with contextlib.suppress(CheckpointError):
        return checkpoint_meta(resume_dir).get("mlflow_run_id")
    return None


def interpolated_keys(cfg: DictConfig) -> list[str]:
    """Keys of the composed config whose value is written as ``${...}``: they follow their source
    (optim.optimizer.lr: ${..lr}), which is compared itself, or name a data file, whose content is compared by
    hash; counting them would name one change twice."""
    return [
        k for k, v in flatten(OmegaConf.to_container(cfg, resolve=False)).items() if isinstance(v, str) and "${" in v
    ]


def resume_changes(conf: RunConf, derived: list[str], resume_dir: Path) -> dict[str, tuple[Any, Any]]:
    """What differs from the run that wrote ``resume_dir``: its ``config.yaml`` (in that run dir) and the data file
    hashes its checkpoint recorded; ``derived`` keys (``interpolated_keys``) are not compared. Raises
    ``ConfigError`` (one line naming the keys) unless ``resume_allow_changes`` accepts every change; returns the
    accepted ones."""
    saved_config = resume_dir.parent.parent / CONFIG_FILE
    used = conf.as_dict()
    if saved_config.is_file():
        changes = changed(OmegaConf.to_container(OmegaConf.load(saved_config)), used, (*RESUME_IGNORED, *derived))
    else:
        log.warning("resume: no %s beside %s; only the data files are compared", CONFIG_FILE, resume_dir)
        changes = {}
    with contextlib.suppress(CheckpointError):  # an unreadable checkpoint is refused by name later, in the run
        saved_hashes = checkpoint_meta(resume_dir).get("data_sha256") or {}
        now = data_hashes(conf.data.files())
        changes.update({k: (v, now.get(k, "<missing>")) for k, v in saved_hashes.items() if now.get(k) != v})
    bad = refused(changes, conf.resume_allow_changes)
    if bad:
        raise ConfigError(
            f"resume={conf.resume}: {len(bad)} setting(s) differ from the checkpoint's run "
            f"({describe({k: changes[k] for k in bad})}); resume with the settings it was trained "
            f"with, or accept them with resume_allow_changes=[{','.join(bad)}] (or true)"
        )
    if changes:
        log.warning("resume: accepted changes since the checkpoint: %s", describe(changes))
    return changes
