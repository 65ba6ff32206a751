"""Classification metrics against scikit-learn and an explicit count; pass/fail/skipped gates."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import LABELS
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from loralab.metrics import classification_metrics, evaluate_gates


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    y_true, y_pred = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    m = classification_metrics(y_true, y_pred, LABELS)

    s = m["scalars"]
    assert s["val_accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert s["val_macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, labels=[0, 1, 2])
    for i, label in enumerate(LABELS):
        assert m["per_class"][label] == pytest.approx(
            {"precision": p[i], "recall": r[i], "f1": f[i], "support": support[i]}
        )
        assert (s[f"val_precision_{label}"], s[f"val_recall_{label}"], s[f"val_f1_{label}"]) == pytest.approx(
            (p[i], r[i], f[i])
        )

    counted = [[int(np.sum((y_true == t) & (y_pred == q))) for q in range(3)] for t in range(3)]
    assert m["confusion_matrix"] == {"labels": LABELS, "matrix": counted}  # rows: true label, columns: predicted


def test_absent_class_is_left_out_of_macro_f1_and_scalars():
    y_true, y_pred = [0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0]  # "skip" (2) never occurs
    m = classification_metrics(y_true, y_pred, LABELS)
    assert m["scalars"]["val_macro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=[0, 1], average="macro"))
    assert not any(k.endswith("_skip") for k in m["scalars"])
    assert m["per_class"]["skip"]["support"] == 0
    assert [row[2] for row in m["confusion_matrix"]["matrix"]] == [0, 0, 0]


def test_gates_pass_fail_and_skip():
    scalars = {"val_macro_f1": 0.6, "val_f1_long": 0.5}
    gates = evaluate_gates(
        scalars, {"val_macro_f1": ">= 0.60", "val_f1_long": "> 0.55", "val_f1_skip": "> 0.5", "val_accuracy": "< 0.9"}
    )
    assert {k: g["passed"] for k, g in gates.items()} == {
        "val_macro_f1": True,
        "val_f1_long": False,
        "val_f1_skip": None,
        "val_accuracy": None,
    }
    assert gates["val_macro_f1"] == {"rule": ">= 0.60", "value": 0.6, "passed": True}
    assert gates["val_f1_skip"]["value"] is None and "skipped" in gates["val_f1_skip"]["note"]


@pytest.mark.parametrize(
    ("rule", "passed"),
    [
        ("> 0.6", False),
        (">= 0.6", True),
        ("< 0.6", False),
        ("<= 0.6", True),
        ("> 0.59", True),
        (">=0.6", True),
        ("<0.6", False),
    ],
)
def test_gate_operators_at_the_boundary(rule, passed):
    assert evaluate_gates({"m": 0.6}, {"m": rule})["m"]["passed"] is passed


@pytest.mark.parametrize("rule", ["== 0.6", "=> 0.6", "0.6", ">= high"])
def test_malformed_gate_rejected(rule):
    with pytest.raises(ValueError, match="not '<op> <number>'"):
        evaluate_gates({"m": 0.6}, {"m": rule})
