"""Packaging a model directory as a zip (size-gated), and unpacking one safely."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path


class ExportError(RuntimeError):
    pass


def zip_dir(src: str | Path, zip_path: str | Path, max_mb: float = 500.0) -> Path:
    """Zip ``src`` into ``zip_path``; refuse (and leave nothing behind) when the zip exceeds ``max_mb``."""
    src, zip_path = Path(src), Path(zip_path)
    tmp = zip_path.with_name(zip_path.name + ".tmp")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(src.rglob("*")):
                if path.is_file():
                    zf.write(path, path.relative_to(src).as_posix())
        size_mb = tmp.stat().st_size / 2**20
        if size_mb > max_mb:
            raise ExportError(f"{zip_path.name} would be {size_mb:.1f} MB, over the export.max_size_mb="
                              f"{max_mb:g} limit; raise the limit or zip fewer parts")
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        tmp.replace(zip_path)
    finally:
        tmp.unlink(missing_ok=True)
    return zip_path


def safe_extract(zip_path: str | Path, dest: str | Path) -> Path:
    """Extract, refusing any member that would land outside ``dest`` (absolute paths, ``..``, links)."""
    dest = Path(dest).resolve()
    with zipfile.ZipFile(zip_path) as zf:
        for info in zf.infolist():
            target = (dest / info.filename).resolve()
            if not target.is_relative_to(dest) or info.filename.startswith(("/", "\\")):
                raise ExportError(f"{zip_path}: refusing entry {info.filename!r} outside the target directory")
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise ExportError(f"{zip_path}: refusing symbolic link entry {info.filename!r}")
        zf.extractall(dest)
    return dest
