"""Checkpoints: inference weights and resumable training state, each a directory written with ``fs.atomic_dir``."""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any, Callable, TypeVar, cast

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from loralab.core.distributed import Dist
from loralab.errors import CheckpointError
from loralab.fs import atomic_dir, file_manifest, manifest_mismatch, sha256_file

log = logging.getLogger(__name__)

T = TypeVar("T")


MODEL_META = "loralab_checkpoint.json"  # in a model dir: what the weights are for, and the sha256 of every file


def save_checkpoint(directory: str | Path, model, tokenizer, meta: dict[str, Any]) -> Path:
    """A model dir: weights (safetensors; the adapter + head for a peft model, all weights otherwise), tokenizer,
    config and ``loralab_checkpoint.json`` (``meta`` plus ``files``, the manifest ``read_model_meta`` checks). The
    best epoch's weights (``checkpoint_best/``) and a pretrained base in the cache are both written this way."""
    with atomic_dir(directory) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MODEL_META).write_text(json.dumps({**meta, "files": file_manifest(tmp)}, indent=2, default=str))
    return Path(directory)


def read_model_meta(directory: str | Path) -> dict[str, Any]:
    """A model dir's ``loralab_checkpoint.json`` once every file matches its manifest; ``CheckpointError`` (one
    line naming the file) for an unreadable meta, a missing, extra or changed file."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / MODEL_META).read_text())
        problem = manifest_mismatch(directory, meta["files"], skip=[MODEL_META])
    except (OSError, ValueError, KeyError, TypeError) as err:
        problem = f"{MODEL_META} is unreadable or has no manifest ({type(err).__name__}: {_first_line(err)})"
    if problem is not None:
        raise CheckpointError(f"{directory}: {problem}; refusing to load it")
    return meta


# --- resumable training state -------------------------------------------------------------------------------------
# A checkpoint dir holds ``weights.safetensors`` (the trainable tensors, exact state-dict keys), ``trainer_state.pt``
# (optimizer, scheduler, grad scaler, RNG states, loop counters; plain tensors and primitives, so it loads with
# ``torch.load(weights_only=True)``), the tokenizer and ``checksums.json`` (the sha256 of every other file and the
# meta, written inside the same atomic directory swap).

WEIGHTS, STATE, CHECKSUMS = "weights.safetensors", "trainer_state.pt", "checksums.json"


def write_checksums(directory: Path, meta: dict[str, Any]) -> None:
    """``checksums.json``: the sha256 of every file under ``directory`` and the meta as JSON, so the run id and
    data hashes can be read without unpickling anything, and a flipped bit or a truncated file is caught."""
    files = {p.relative_to(directory).as_posix(): sha256_file(p) for p in sorted(directory.rglob("*")) if p.is_file()}
    (directory / CHECKSUMS).write_text(json.dumps({"sha256": files, "meta": meta}, indent=1, default=str))


def read_checksums(directory: str | Path) -> dict[str, Any] | None:
    """The parsed ``checksums.json``, or None for a checkpoint written before loralab wrote one."""
    path = Path(directory) / CHECKSUMS
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest.get("sha256"), dict):
            raise ValueError("no sha256 table")
    except (OSError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{path}: unreadable ({_first_line(err)})") from None
    return manifest


def verify_checkpoint(directory: str | Path) -> dict[str, Any] | None:
    """Check every file of a checkpoint against ``checksums.json``; ``CheckpointError`` (one line, naming the file)
    on a missing, unreadable or changed one. Returns the manifest (None, with a warning, for an older checkpoint
    without one: its files are still loaded through the error-checked readers)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    manifest = read_checksums(directory)
    if manifest is None:
        log.warning("%s: no %s (written by an older loralab); its files cannot be verified", directory, CHECKSUMS)
        return None
    for name, digest in manifest["sha256"].items():
        path = directory / name
        try:
            actual = sha256_file(path)
        except OSError as err:
            raise CheckpointError(f"{path}: unreadable ({err.strerror or _first_line(err)})") from None
        if actual != digest:
            raise CheckpointError(
                f"{path}: sha256 does not match {CHECKSUMS} (the file is corrupt or was changed "
                f"after it was saved); refusing to load it"
            )
    return manifest


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:300]


def _read(path: Path, load: Callable[[Path], T]) -> T:
    """``load(path)`` with any failure (truncated file, bad header, unpickling) as a one-line ``CheckpointError``."""
    try:
        return load(path)
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__}: {_first_line(err)})") from None


def _load_state(path: Path) -> dict[str, Any]:
    return _read(path, lambda p: torch.load(p, weights_only=True, map_location="cpu"))


def _check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{where}: tensor {name} contains NaN/Inf; refusing it")


def rng_state() -> dict[str, Any]:
    np_state = cast(tuple, np.random.get_state(legacy=True))  # (name, keys, pos, has_gauss, cached_gaussian)
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


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


def save_train_state(
    directory: str | Path,
    *,
    model,
    optimizer,
    scheduler,
    scaler,
    loop_state: dict[str, Any],
    meta: dict[str, Any],
    tokenizer=None,
) -> Path:
    """Everything needed to continue training bit-for-bit (on CPU), written atomically."""
    weights = trainable_tensors(model)
    _check_finite(weights, f"saving {directory}")
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_state(),
        "loop": loop_state,
        "meta": meta,
    }
    with atomic_dir(directory) as tmp:
        save_file(weights, tmp / WEIGHTS)
        torch.save(state, tmp / STATE)
        if tokenizer is not None:  # a trained tokenizer is part of the model: resume must reuse it
            tokenizer.save_pretrained(tmp / "tokenizer")
        write_checksums(tmp, meta)
    return Path(directory)


def load_weights(directory: str | Path, model) -> None:
    """Load a checkpoint's trainable tensors into ``model``, checking checksums, names, shapes and finiteness
    first."""
    verify_checkpoint(directory)
    weights = _read(Path(directory) / WEIGHTS, load_file)
    _check_finite(weights, f"loading {directory}")
    current = model.state_dict()
    for name, t in weights.items():
        if name not in current or current[name].shape != t.shape:
            raise CheckpointError(
                f"{directory}: tensor {name} {tuple(t.shape)} does not fit this model "
                f"({tuple(current[name].shape) if name in current else 'missing'})"
            )
    model.load_state_dict(weights, strict=False)


def load_train_state(directory: str | Path, *, model, optimizer, scheduler, scaler) -> dict[str, Any]:
    """Restore a ``save_train_state`` checkpoint; returns its loop state and meta."""
    directory = Path(directory)
    if not (directory / WEIGHTS).is_file() or not (directory / STATE).is_file():
        raise CheckpointError(f"{directory} is not a complete loralab checkpoint ({WEIGHTS} + {STATE})")
    load_weights(directory, model)  # verifies every file's checksum first
    state = _load_state(directory / STATE)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return state


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The small part of a checkpoint (loop counters, MLflow run id) without touching a model."""
    state = _load_state(Path(directory) / STATE)
    return {"loop": state["loop"], "meta": state["meta"]}


def checkpoint_meta(directory: str | Path) -> dict[str, Any]:
    """The meta (MLflow run id, ranked epochs, data hashes) from ``checksums.json``, else from the state file."""
    manifest = read_checksums(directory)
    return manifest["meta"] if manifest is not None and "meta" in manifest else read_meta(directory)["meta"]


def verify_resumable(directory: str | Path) -> None:
    """A resume point and the ranked epochs it will choose the best from, all verified before anything loads: a
    corrupt one is refused by name rather than silently skipped (the best epoch would change without a word)."""
    directory = Path(directory)
    verify_checkpoint(directory)
    for entry in checkpoint_meta(directory).get("top_k", []):
        if (directory.parent / entry["name"]).is_dir():
            verify_checkpoint(directory.parent / entry["name"])


def rotate_top_k(checkpoint_dir: Path, ranked: list[dict[str, Any]], keep: int) -> list[dict[str, Any]]:
    """Delete epoch checkpoints that fell out of the top ``keep``; ``ranked`` is best first."""
    for entry in ranked[keep:]:
        shutil.rmtree(checkpoint_dir / entry["name"], ignore_errors=True)
    return ranked[:keep]


class Checkpoints:
    """The resumable checkpoints of one run dir: ``last`` after every evaluation (and on a stop), and the top
    ``keep`` evaluations (epochs, val checks) by the monitored value, ``ranked`` best first. Only rank 0 writes;
    every rank can resume from them."""

    def __init__(
        self,
        directory: Path,
        *,
        keep: int,
        mode: str,
        meta: dict[str, Any],
        tokenizer=None,
        resume_from: Path | None = None,
        ddp: Dist = Dist(),
    ):
        self.dir, self.keep, self.mode, self.meta = Path(directory), keep, mode, meta
        self.tokenizer, self.resume_from, self.ddp = tokenizer, resume_from, ddp
        self.ranked: list[dict[str, Any]] = []
        self.parts: dict[str, Any] = {}

    def restore(self, *, model, optimizer, scheduler, scaler) -> dict[str, Any] | None:
        """Load ``resume_from`` into the parts; returns its loop state (None for a fresh run)."""
        if self.resume_from is None:
            return None
        saved = load_train_state(self.resume_from, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        self.ranked = self._adopt(self.resume_from.parent, saved["meta"]["top_k"])
        return saved["loop"]

    def bind(self, **parts: Any) -> None:
        """The model, optimizer, scheduler and scaler every later save writes."""
        self.parts = parts

    def save(self, name: str, loop_state: dict[str, Any]) -> None:
        if self.ddp.is_main:
            save_train_state(
                self.dir / name,
                **self.parts,
                loop_state=loop_state,
                tokenizer=self.tokenizer,
                meta={**self.meta, "top_k": self.ranked},
            )

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
        if entry in self.ranked[: self.keep]:
            self.save(entry["name"], loop_state)
        self.save_last(loop_state)  # after the top-k entry, so `last` never points at a missing one
        if self.ddp.is_main:
            self.ranked = rotate_top_k(self.dir, self.ranked, self.keep)
        else:
            self.ranked = self.ranked[: self.keep]

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
            log.warning(
                "resume: %d ranked checkpoint(s) of %s not found; the best epoch is chosen among the rest",
                len(ranked) - len(kept),
                source,
            )
        return kept
