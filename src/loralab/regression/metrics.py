"""Regression metrics, a thin layer over scikit-learn: per target and averaged over targets."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import (
    mean_absolute_error,
    mean_squared_error,
    r2_score,
    root_mean_squared_error,
)


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray, names: Sequence[str],
                       prefix: str = "val_") -> dict[str, float]:
    """``val_mae``/``val_rmse``/``val_mse``/``val_r2`` (uniform average over targets) and the same per target
    (``val_mae_<name>``…). One column of ``y_true``/``y_pred`` per name."""
    y_true = np.asarray(y_true, dtype=np.float64).reshape(len(y_true), -1)
    y_pred = np.asarray(y_pred, dtype=np.float64).reshape(len(y_pred), -1)
    if y_true.shape != y_pred.shape or y_true.shape[1] != len(names):
        raise ValueError(f"shapes {y_true.shape} / {y_pred.shape} do not match {len(names)} target names")
    fns = {"mse": mean_squared_error, "mae": mean_absolute_error, "rmse": root_mean_squared_error,
           "r2": r2_score}
    out: dict[str, float] = {}
    for short, fn in fns.items():
        per_target = fn(y_true, y_pred, multioutput="raw_values")
        out[f"{prefix}{short}"] = float(np.mean(per_target))
        out.update({f"{prefix}{short}_{name}": float(v) for name, v in zip(names, per_target)})
    return out


def metric_names(names: Sequence[str], prefix: str = "val_") -> list[str]:
    """Every key ``regression_metrics`` returns for these targets (config validation checks monitors against it)."""
    shorts = ("mse", "mae", "rmse", "r2")
    return [f"{prefix}{s}" for s in shorts] + [f"{prefix}{s}_{n}" for s in shorts for n in names]
