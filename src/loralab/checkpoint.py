"""Checkpoint directories that are either complete or absent: written aside, fsynced, then swapped in."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``final`` in two renames.

    A crash while writing leaves ``final`` untouched (only a ``.tmp`` sibling to clean up); a crash between the
    two renames leaves the previous version at ``<final>.old``, which ``recover`` puts back.
    """
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    old = final.with_name(final.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def recover(final: str | Path) -> None:
    """Undo a swap interrupted between its two renames."""
    final = Path(final)
    old = final.with_name(final.name + ".old")
    if not final.exists() and old.exists():
        old.rename(final)


def save_checkpoint(directory: str | Path, model, tokenizer, meta: dict[str, Any]) -> Path:
    """Weights (safetensors; the adapter + head for a peft model, all weights otherwise), tokenizer, config and
    ``loralab_checkpoint.json`` (labels, epoch, metrics)."""
    with atomic_dir(directory) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "loralab_checkpoint.json").write_text(json.dumps(meta, indent=2, default=str))
    return Path(directory)
