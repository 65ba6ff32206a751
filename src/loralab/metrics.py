"""Classification metrics (a thin layer over scikit-learn) and the pass/fail gates read from config."""

from __future__ import annotations

import operator
import re
from typing import Any, Mapping, Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
_RULE = re.compile(r"^\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*$")


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str],
                           prefix: str = "val_") -> dict[str, Any]:
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
        per_class[label] = {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                            "support": int(s[i])}
        if s[i] > 0:  # metrics of a class with no examples are meaningless, keep them out of the scalars
            scalars[f"{prefix}precision_{label}"] = float(p[i])
            scalars[f"{prefix}recall_{label}"] = float(r[i])
            scalars[f"{prefix}f1_{label}"] = float(f[i])
    return {
        "scalars": scalars,
        "per_class": per_class,
        "confusion_matrix": {"labels": list(labels),
                             "matrix": confusion_matrix(y_true, y_pred, labels=idx).tolist()},
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
            out[metric] = {"rule": rule, "value": None, "passed": None,
                           "note": "skipped: metric not available (class absent from this data set?)"}
            continue
        value = scalars[metric]
        out[metric] = {"rule": rule, "value": value, "passed": bool(_OPS[op](value, float(threshold)))}
    return out
