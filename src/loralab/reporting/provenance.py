"""Where a result came from: code version, data hashes, packages, machine, time. Logged as MLflow tags and saved
with every summary and export."""

from __future__ import annotations

import platform
import subprocess
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Mapping

from loralab.fs import sha256_file

PACKAGES = ("torch", "transformers", "peft", "mlflow", "hydra-core", "scikit-learn", "safetensors", "tokenizers")


def package_versions() -> dict[str, str]:
    return {p: version(p) for p in PACKAGES}


def git_state(root: str | Path = ".") -> dict[str, str]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        return {"git_commit": commit or "unknown", "git_dirty": str(bool(git("status", "--porcelain")))}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}


def provenance(root: str | Path, data_files: Mapping[str, str | None]) -> dict[str, str]:
    """Git state of ``root``, host, start time, package versions and the sha256 of each existing data file."""
    prov = {
        **git_state(root),
        "host": platform.node(),
        "start_time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **{f"version.{p}": v for p, v in package_versions().items()},
    }
    for key, path in data_files.items():
        if path and Path(path).is_file():
            prov[f"data.{key}.sha256"] = sha256_file(path)
    return prov


def code_version(prov: Mapping[str, str]) -> dict[str, object]:
    """The git state and package versions of a run's provenance, as summaries and exports record them (read from
    ``prov`` rather than asked of git and importlib again)."""
    return {
        "packages": {p: prov[f"version.{p}"] for p in PACKAGES},
        "git_commit": prov["git_commit"],
        "git_dirty": prov["git_dirty"],
    }
