"""Checkpoints: inference weights and resumable training state, each a directory written with ``fs.atomic_dir``."""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from loralab.core.distributed import Dist
from loralab.errors import CheckpointError
from loralab.fs import atomic_dir

log = logging.getLogger(__name__)


def save_checkpoint(directory: str | Path, model, tokenizer, meta: dict[str, Any]) -> Path:
    """Weights (safetensors; the adapter + head for a peft model, all weights otherwise), tokenizer, config and
    ``loralab_checkpoint.json`` (labels, epoch, metrics)."""
    with atomic_dir(directory) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "loralab_checkpoint.json").write_text(json.dumps(meta, indent=2, default=str))
    return Path(directory)


# --- resumable training state -------------------------------------------------------------------------------------
# A checkpoint dir holds ``weights.safetensors`` (the trainable tensors, exact state-dict keys), ``trainer_state.pt``
# (optimizer, scheduler, grad scaler, RNG states, loop counters; plain tensors and primitives, so it loads with
# ``torch.load(weights_only=True)``) and the tokenizer.

WEIGHTS, STATE = "weights.safetensors", "trainer_state.pt"


def _check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{where}: tensor {name} contains NaN/Inf; refusing it")


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_tensors(model) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items() if k in names}


def save_train_state(directory: str | Path, *, model, optimizer, scheduler, scaler, loop_state: dict[str, Any],
                     meta: dict[str, Any], tokenizer=None) -> Path:
    """Everything needed to continue training bit-for-bit (on CPU), written atomically."""
    weights = trainable_tensors(model)
    _check_finite(weights, f"saving {directory}")
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "rng": rng_state(), "loop": loop_state, "meta": meta}
    with atomic_dir(directory) as tmp:
        save_file(weights, tmp / WEIGHTS)
        torch.save(state, tmp / STATE)
        if tokenizer is not None:  # a trained tokenizer is part of the model: resume must reuse it
            tokenizer.save_pretrained(tmp / "tokenizer")
    return Path(directory)


def load_weights(directory: str | Path, model) -> None:
    """Load a checkpoint's trainable tensors into ``model``, checking names, shapes and finiteness first."""
    weights = load_file(Path(directory) / WEIGHTS)
    _check_finite(weights, f"loading {directory}")
    current = model.state_dict()
    for name, t in weights.items():
        if name not in current or current[name].shape != t.shape:
            raise CheckpointError(f"{directory}: tensor {name} {tuple(t.shape)} does not fit this model "
                                  f"({tuple(current[name].shape) if name in current else 'missing'})")
    model.load_state_dict(weights, strict=False)


def load_train_state(directory: str | Path, *, model, optimizer, scheduler, scaler) -> dict[str, Any]:
    """Restore a ``save_train_state`` checkpoint; returns its loop state and meta."""
    directory = Path(directory)
    if not (directory / WEIGHTS).is_file() or not (directory / STATE).is_file():
        raise CheckpointError(f"{directory} is not a complete loralab checkpoint ({WEIGHTS} + {STATE})")
    load_weights(directory, model)
    state = torch.load(directory / STATE, weights_only=True, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return state


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The small part of a checkpoint (loop counters, MLflow run id) without touching a model."""
    state = torch.load(Path(directory) / STATE, weights_only=True, map_location="cpu")
    return {"loop": state["loop"], "meta": state["meta"]}


def rotate_top_k(checkpoint_dir: Path, ranked: list[dict[str, Any]], keep: int) -> list[dict[str, Any]]:
    """Delete epoch checkpoints that fell out of the top ``keep``; ``ranked`` is best first."""
    for entry in ranked[keep:]:
        shutil.rmtree(checkpoint_dir / entry["name"], ignore_errors=True)
    return ranked[:keep]


class Checkpoints:
    """The resumable checkpoints of one run dir: ``last`` after every evaluation (and on a stop), and the top
    ``keep`` evaluations (epochs, val checks) by the monitored value, ``ranked`` best first. Only rank 0 writes; every rank can resume from them."""

    def __init__(self, directory: Path, *, keep: int, mode: str, meta: dict[str, Any], tokenizer=None,
                 resume_from: Path | None = None, ddp: Dist = Dist()):
        self.dir, self.keep, self.mode, self.meta = Path(directory), keep, mode, meta
        self.tokenizer, self.resume_from, self.ddp = tokenizer, resume_from, ddp
        self.ranked: list[dict[str, Any]] = []
        self.parts: dict[str, Any] = {}

    def restore(self, *, model, optimizer, scheduler, scaler) -> dict[str, Any] | None:
        """Load ``resume_from`` into the parts; returns its loop state (None for a fresh run)."""
        if self.resume_from is None:
            return None
        saved = load_train_state(self.resume_from, model=model, optimizer=optimizer, scheduler=scheduler,
                                 scaler=scaler)
        self.ranked = self._adopt(self.resume_from.parent, saved["meta"]["top_k"])
        return saved["loop"]

    def bind(self, **parts: Any) -> None:
        """The model, optimizer, scheduler and scaler every later save writes."""
        self.parts = parts

    def save(self, name: str, loop_state: dict[str, Any]) -> None:
        if self.ddp.is_main:
            save_train_state(self.dir / name, **self.parts, loop_state=loop_state, tokenizer=self.tokenizer,
                             meta={**self.meta, "top_k": self.ranked})

    def save_last(self, loop_state: dict[str, Any]) -> None:
        self.save("last", loop_state)

    def epoch_end(self, loop_state: dict[str, Any], epoch: int, value: float) -> None:
        """Rank the epoch; save it if it made the top ``keep``; always save ``last``; drop what fell out."""
        # No "=" in the name: the path must work as a Hydra override value (resume=.../epoch_003).
        self._rank(loop_state, {"name": f"epoch_{epoch:03d}", "epoch": epoch, "value": value})

    def check(self, loop_state: dict[str, Any], step: int, epoch: int, value: float) -> None:
        """``epoch_end`` for an evaluation inside epoch ``epoch`` (a val check): ranked alongside the epochs."""
        self._rank(loop_state, {"name": f"step_{step:07d}", "epoch": epoch, "step": step, "value": value})

    def _rank(self, loop_state: dict[str, Any], entry: dict[str, Any]) -> None:
        self.ranked = sorted([*self.ranked, entry], key=lambda e: e["value"], reverse=self.mode == "max")
        if entry in self.ranked[:self.keep]:
            self.save(entry["name"], loop_state)
        self.save_last(loop_state)  # after the top-k entry, so `last` never points at a missing one
        if self.ddp.is_main:
            self.ranked = rotate_top_k(self.dir, self.ranked, self.keep)
        else:
            self.ranked = self.ranked[:self.keep]

    def load_best(self, model) -> None:
        if self.ranked:
            load_weights(self.dir / self.ranked[0]["name"], model)
        else:
            log.warning("no ranked checkpoint to reload (resumed after the last epoch?); using the current weights")

    def _adopt(self, source: Path, ranked: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Resuming from another run's checkpoint: copy that run's ranked epochs here, so the best epoch can still
        be reloaded at the end; entries whose directories are gone drop out of the ranking."""
        if source.resolve() != self.dir.resolve() and self.ddp.is_main:
            for entry in ranked:
                if (source / entry["name"]).is_dir() and not (self.dir / entry["name"]).exists():
                    shutil.copytree(source / entry["name"], self.dir / entry["name"])
        self.ddp.barrier()
        kept = [e for e in ranked if (self.dir / e["name"]).is_dir()]
        if len(kept) < len(ranked):
            log.warning("resume: %d ranked checkpoint(s) of %s not found; the best epoch is chosen among the rest",
                        len(ranked) - len(kept), source)
        return kept
