"""Zips that are safe to write and to open: a size-gated ``zip_dir``, and extraction that refuses absolute paths,
``..``, links, anything resolving outside the target, and more bytes than the caller allows (zip bombs). Exports
and the packaged test model travel this way; ``export.extract_export`` adds the manifest check on top."""

from __future__ import annotations

import contextlib
import hashlib
import zipfile
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

from loralab.errors import ExportError
from loralab.fs import atomic_path


def zip_dir(src: str | Path, zip_path: str | Path, max_mb: float = 500.0, include: Sequence[str] | None = None) -> Path:
    """Zip ``src`` (or only its top-level entries named in ``include``) into ``zip_path``; refuse, and leave
    nothing behind, when the zip exceeds ``max_mb``."""
    src, zip_path = Path(src), Path(zip_path)
    roots = [src / name for name in include] if include is not None else [src]
    with atomic_path(zip_path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for root in roots:
                for path in [root] if root.is_file() else sorted(root.rglob("*")):
                    if path.is_file():
                        zf.write(path, path.relative_to(src).as_posix())
        size_mb = tmp.stat().st_size / 2**20
        if size_mb > max_mb:
            raise ExportError(
                f"{zip_path.name} would be {size_mb:.1f} MB, over the export.max_size_mb="
                f"{max_mb:g} limit; raise the limit or zip fewer parts (export.zip_parts)"
            )
    return zip_path


def _unsafe_reason(info: zipfile.ZipInfo) -> str | None:
    name = info.filename
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in parts:
        return "parent-directory component"
    if (info.external_attr >> 16) & 0o170000 == 0o120000:
        return "symbolic link"
    return None


@contextlib.contextmanager
def checked_zip(zip_path: str | Path, dest: Path) -> Iterator[zipfile.ZipFile]:
    """The open zip, once every entry is known safe to extract into ``dest``: no absolute or drive paths, no ``..``,
    no links, nothing resolving outside ``dest``."""
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as err:
        raise ExportError(f"{zip_path}: not a readable zip file ({err})") from err
    with zf:
        for info in zf.infolist():
            reason = _unsafe_reason(info)
            if reason is None and not (dest / info.filename).resolve().is_relative_to(dest):
                reason = "resolves outside the target directory"
            if reason:
                raise ExportError(f"{zip_path}: refusing entry {info.filename!r} ({reason})")
        yield zf


def safe_extract(zip_path: str | Path, dest: str | Path, max_mb: float | None = None) -> Path:
    """Extract a zip whose entries are safe (``checked_zip``) and, with ``max_mb``, hold no more uncompressed bytes
    than that (zip bombs)."""
    dest = Path(dest).resolve()
    with checked_zip(zip_path, dest) as zf:
        total = sum(info.file_size for info in zf.infolist())
        if max_mb is not None and total > max_mb * 2**20:
            raise ExportError(f"{zip_path}: {total / 2**20:.1f} MB uncompressed, over the {max_mb:g} MB limit")
        zf.extractall(dest)
    return dest


def extract_entry(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, max_bytes: int, sha256: str | None, zip_path
) -> None:
    """One entry to ``dest``, reading at most ``max_bytes``; its sha256 must be ``sha256`` (when given)."""
    target = dest / info.filename  # inside dest: checked_zip saw to it
    target.parent.mkdir(parents=True, exist_ok=True)
    digest, written = hashlib.sha256(), 0
    try:
        with zf.open(info) as src, target.open("wb") as out:
            while chunk := src.read(1 << 20):
                written += len(chunk)
                if written > max_bytes:
                    raise ExportError(f"{zip_path}: entry {info.filename!r} unpacks past {max_bytes} bytes")
                digest.update(chunk)
                out.write(chunk)
    except (zipfile.BadZipFile, OSError) as err:
        raise ExportError(f"{zip_path}: entry {info.filename!r} is unreadable ({err})") from err
    if sha256 is not None and digest.hexdigest() != sha256:
        raise ExportError(f"{zip_path}: {info.filename} does not match its sha256 in the manifest (corrupt or altered)")
