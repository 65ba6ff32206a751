"""MarketSentinel inputs: ``feature_schema.txt`` and HDF5 files holding ``X`` (N × F) and ``y`` (N × targets).

The schema is the single source of the feature count: a file whose ``X`` is not as wide as the schema is refused,
never silently accepted, because a shifted column means every prediction is wrong without any error.
"""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from loralab.data.records import DataError

log = logging.getLogger(__name__)


def read_schema(path: str | Path) -> list[str]:
    """Feature names, one a line (blank lines ignored); duplicates and an empty schema are errors."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"feature schema not found: {path}")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path}: no feature names")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"{path}: duplicate feature names {dupes[:5]}")
    return names


class H5Regression(Dataset):
    """``X`` and ``y`` of one HDF5 file, read once into memory, rows kept in file (time) order."""

    def __init__(self, path: str | Path, input_dim: int, n_targets: int):
        path = Path(path)
        if not path.is_file():
            raise DataError(f"HDF5 file not found: {path}")
        with h5py.File(path, "r") as fh:
            missing = [k for k in ("X", "y") if k not in fh]
            if missing:
                raise DataError(f"{path}: missing dataset(s) {missing}; expected 'X' (N x F) and 'y' (N x 2)")
            x, y = np.asarray(fh["X"], dtype=np.float32), np.asarray(fh["y"], dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != input_dim:
            raise DataError(
                f"{path}: X has shape {x.shape}, but the feature schema lists {input_dim} features; "
                f"the file and the schema disagree"
            )
        if y.ndim != 2 or y.shape[1] != n_targets:
            raise DataError(f"{path}: y has shape {y.shape}, expected (N, {n_targets})")
        if len(x) != len(y) or len(x) == 0:
            raise DataError(f"{path}: X has {len(x)} rows and y {len(y)}; need the same number, at least one")
        for name, arr in (("X", x), ("y", y)):
            bad = int((~np.isfinite(arr)).any(axis=1).sum())
            if bad:
                raise DataError(
                    f"{path}: {bad} rows of {name} hold NaN/Inf (first at row "
                    f"{int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])})"
                )
        self.path = str(path)
        self.features, self.targets = torch.from_numpy(x), torch.from_numpy(y)
        log.info("%s: %d rows x %d features", path.name, len(x), input_dim)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"features": self.features[i], "labels": self.targets[i]}
