"""Files and directories that are either complete or absent: written aside, fsynced, then renamed into place.

A reader (another rank, a sweep job, a resumed run) sees the old version or the new one, never half a file, and a
crash mid-write leaves the previous version intact. Bottom layer: only loralab.errors is imported here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator

from loralab.errors import ConfigError


def fsync_dir(directory: str | Path) -> None:
    """Make a rename inside ``directory`` survive a power cut (the file's own fsync does not cover it)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write by name (h5py, safetensors, zipfile, savefig...); on a clean
    exit it is fsynced and renamed over ``path``, on an exception deleted. The name is unique per process and
    call, so concurrent writers of one path never share a temp file: each renames a whole file, the last wins."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def writable_dir(directory: str | Path, key: str) -> Path:
    """Create ``directory`` if needed and write (then remove) a file in it, so an unwritable output is one line
    naming ``key`` and the path before any work, not a ``PermissionError`` traceback after an epoch of training."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe.{os.getpid()}-{secrets.token_hex(4)}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{key}: {directory} is not a writable directory ({err.strerror or err})") from None
    return directory


def writable_file(path: str | Path, key: str) -> Path:
    """A file path that ``atomic_path`` can write: not a directory, in a writable directory."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{key}: {path} is a directory; give a file path")
    writable_dir(path.parent, key)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """UTF-8 whatever the locale: files are read back on other machines."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any, indent: int | None = 2) -> Path:
    """Values JSON cannot hold (paths, numpy scalars, dates) are written as their ``str``."""
    return atomic_write_text(path, json.dumps(data, indent=indent, default=str))


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            _fsync_file(path)
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(root)


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
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover(final: str | Path) -> None:
    """Undo a swap interrupted between its two renames."""
    final = Path(final)
    old = final.with_name(final.name + ".old")
    if not final.exists() and old.exists():
        old.rename(final)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Read in chunks: model weights do not fit in memory twice (``hashlib.file_digest`` needs Python 3.11)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_manifest(root: str | Path, under: str = "", skip: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """``{relative/posix/path: {sha256, bytes}}`` of every file below ``root/under`` (paths relative to ``root``),
    but ``skip``: what a directory holds, to check it against later (``manifest_mismatch``)."""
    root, skipped = Path(root), set(skip)
    files = {}
    for path in sorted((root / under).rglob("*")):
        name = path.relative_to(root).as_posix()
        if path.is_file() and name not in skipped:
            files[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return files


def manifest_mismatch(root: str | Path, files: dict[str, dict[str, Any]], skip: Iterable[str] = ()) -> str | None:
    """Why ``root`` does not hold exactly ``files`` (one file named), or None. Sizes are compared before hashes."""
    root, skipped = Path(root), set(skip)
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - skipped
    if extra := sorted(present - set(files)):
        return f"{extra[0]} is not in its manifest"
    if missing := sorted(set(files) - present):
        return f"{missing[0]} is missing"
    for name in sorted(files):
        if (root / name).stat().st_size != files[name]["bytes"] or sha256_file(root / name) != files[name]["sha256"]:
            return f"{name} does not match its sha256"
    return None
