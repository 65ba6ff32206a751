"""Classification and regression metrics (a thin layer over scikit-learn), the names each reports, and the pass/fail
gates read from config."""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    mean_absolute_error,
    mean_squared_error,
    precision_recall_fscore_support,
    r2_score,
    root_mean_squared_error,
)

_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
_RULE = re.compile(r"^\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*$")


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str], prefix: str = "val_"
) -> dict[str, Any]:
    """Flat scalar metrics (``val_macro_f1``, ``val_f1_long``…) plus the per-class table and confusion matrix.

    Macro-F1 averages over the classes present in ``y_true`` or ``y_pred`` (scikit-learn's default), so a class a
    data set never has does not drag the score to zero.
    """
    idx = list(range(len(labels)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=idx, zero_division=0)
    present = sorted(set(np.asarray(y_true).tolist()) | set(np.asarray(y_pred).tolist()))
    scalars: dict[str, float] = {
        f"{prefix}accuracy": float(accuracy_score(y_true, y_pred)),
        f"{prefix}macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
    }
    per_class = {}
    for i, label in enumerate(labels):
        per_class[label] = {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        if s[i] > 0:  # metrics of a class with no examples are meaningless, keep them out of the scalars
            scalars[f"{prefix}precision_{label}"] = float(p[i])
            scalars[f"{prefix}recall_{label}"] = float(r[i])
            scalars[f"{prefix}f1_{label}"] = float(f[i])
    return {
        "scalars": scalars,
        "per_class": per_class,
        "confusion_matrix": {"labels": list(labels), "matrix": confusion_matrix(y_true, y_pred, labels=idx).tolist()},
    }


def is_rule(rule: Any) -> bool:
    """A gate rule is '<op> <number>' with op in >=, >, <=, <."""
    return bool(_RULE.match(str(rule)))


def evaluate_gates(scalars: Mapping[str, float], gates: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Check each ``metric: "op threshold"`` gate. Reported, never fatal; a missing metric is skipped with a note."""
    out = {}
    for metric, rule in gates.items():
        match = _RULE.match(str(rule))
        if not match:
            raise ValueError(f"gate {metric}: {rule!r} is not '<op> <number>' with op in {sorted(_OPS)}")
        op, threshold = match.groups()
        if metric not in scalars:
            out[metric] = {
                "rule": rule,
                "value": None,
                "passed": None,
                "note": "skipped: metric not available (class absent from this data set?)",
            }
            continue
        value = scalars[metric]
        out[metric] = {"rule": rule, "value": value, "passed": bool(_OPS[op](value, float(threshold)))}
    return out


def regression_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, names: Sequence[str], prefix: str = "val_"
) -> dict[str, float]:
    """``val_mae``/``val_rmse``/``val_mse``/``val_r2`` (uniform average over targets) and the same per target
    (``val_mae_<name>``…). One column of ``y_true``/``y_pred`` per name."""
    y_true = np.asarray(y_true, dtype=np.float64).reshape(len(y_true), -1)
    y_pred = np.asarray(y_pred, dtype=np.float64).reshape(len(y_pred), -1)
    if y_true.shape != y_pred.shape or y_true.shape[1] != len(names):
        raise ValueError(f"shapes {y_true.shape} / {y_pred.shape} do not match {len(names)} target names")
    fns = {"mse": mean_squared_error, "mae": mean_absolute_error, "rmse": root_mean_squared_error, "r2": r2_score}
    out: dict[str, float] = {}
    for short, fn in fns.items():
        per_target = fn(y_true, y_pred, multioutput="raw_values")
        out[f"{prefix}{short}"] = float(np.mean(per_target))
        out.update({f"{prefix}{short}_{name}": float(v) for name, v in zip(names, per_target)})
    return out


REGRESSION_SCORES = ("mse", "mae", "rmse", "r2")


@dataclass(frozen=True)
class MetricNames:
    """The validation metrics a task reports, known before it runs: ``trainer.monitor`` must be one of them.
    ``prefixes``: names the data decides (regression targets read from the file) pass by their prefix."""

    known: frozenset[str]
    rule: str  # the one-line text of a monitor that is none of them
    prefixes: tuple[str, ...] = ()

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self.known or name.startswith(self.prefixes))


def classification_metric_names(labels: Sequence[str]) -> MetricNames:
    """The scalars ``classification_metrics`` returns for ``labels``, and the trainer's ``val_loss``."""
    known = {
        "val_macro_f1",
        "val_accuracy",
        "val_loss",
        *(f"val_{m}_{label}" for m in ("precision", "recall", "f1") for label in labels),
    }
    return MetricNames(
        frozenset(known), "must be val_macro_f1, val_accuracy, val_loss or val_<precision|recall|f1>_<label>"
    )


def regression_metric_names(names: Sequence[str] | None) -> MetricNames:
    """The keys ``regression_metrics`` returns for these targets, and ``val_loss``; ``names=None`` (the data names
    them): per-target keys pass by prefix."""
    known = {
        "val_loss",
        *(f"val_{s}" for s in REGRESSION_SCORES),
        *(f"val_{s}_{n}" for s in REGRESSION_SCORES for n in names or ()),
    }
    prefixes = tuple(f"val_{s}_" for s in REGRESSION_SCORES) if names is None else ()
    return MetricNames(
        frozenset(known),
        f"must be one of {sorted(known)[:5]} or val_<{'|'.join(REGRESSION_SCORES)}>_<target>",
        prefixes,
    )
