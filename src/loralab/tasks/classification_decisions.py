"""``decision=precision`` in a classification run: the thresholds chosen and measured out of fold on val (on the
probabilities the export serves), each val row's decision (``decisions_val.jsonl``), the precision–coverage plot,
and the test split decided once with the exported thresholds."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from loralab import decisions
from loralab.calibrate import fit_temperature, probabilities
from loralab.config.tasks import ClassificationConf
from loralab.data.records import write_rows
from loralab.ensemble import blend, calibrated_baseline
from loralab.metrics import evaluate_gates
from loralab.reporting.plots import precision_coverage
from loralab.tasks.base import RunContext

PLOT = "plots/precision_coverage.png"


def fold_probabilities(
    conf: ClassificationConf,
    logits: np.ndarray,
    y: np.ndarray,
    base_probs: np.ndarray | None,
    ensemble: dict[str, Any] | None,
) -> Callable[[int, np.ndarray], np.ndarray]:
    """What the export would serve had it been calibrated on a fold's training rows only: the model's probabilities
    at a temperature fit on those rows, or (``ensemble=blend``) the blend with that fold's temperatures and weight,
    which the ensemble's cross-fit chose on the same rows."""
    if ensemble is not None and base_probs is not None:
        weights, temps = ensemble["fold_weights"], ensemble["fold_temperatures"]
        return lambda fold, fit: blend(
            probabilities(logits, temps[fold]["model"]),
            calibrated_baseline(base_probs, temps[fold]["baseline"]),
            weights[fold],
        )
    c = conf.calibration
    if c.method == "none":
        return lambda fold, fit: probabilities(logits)
    return lambda fold, fit: probabilities(logits, fit_temperature(logits[fit], y[fit], list(c.t_bounds)))


def val_decisions(
    conf: ClassificationConf,
    served: np.ndarray,
    y: np.ndarray,
    probs_for: Callable[[int, np.ndarray], np.ndarray],
    fold_rows: Sequence[np.ndarray],
    rows: Sequence[Any],
    ctx: RunContext,
) -> dict[str, Any]:
    """The decision report (``metrics.json``'s ``decision``; ``decision.*`` in MLflow), ``decisions_val.jsonl`` (per
    val row: the served probabilities, the exported thresholds' decision and the out-of-fold one) and the plot."""
    d, labels = conf.decision, list(conf.data.labels)
    report, oof = decisions.report(
        probs_for,
        served,
        y,
        fold_rows,
        labels,
        dict(d.targets),
        d.fallback,
        d.min_rows,
        dict(conf.trainer.gates or {}),
    )
    decided, abstained = decisions.decide(served, *decisions.thresholds_by_index(report, labels))
    write_rows(
        ctx.out_dir / "decisions_val.jsonl",
        (
            {
                "id": r.id,
                "label": r.label,
                "decision": labels[k],
                "abstained": bool(a),
                "oof_decision": labels[o],
                "probs": dict(zip(labels, p.tolist())),
            }
            for r, k, a, o, p in zip(rows, decided, abstained, oof, served)
        ),
    )
    report["plot"] = str(plot(report, served, y, labels, ctx.out_dir / PLOT))
    ctx.tracker.log_metrics(mlflow_scalars(report))
    ctx.tracker.log_artifact(ctx.out_dir / PLOT, "plots")
    ctx.tracker.set_tags({"decision.gates_passed": passed(report["gates"])})
    return report


def plot(report: dict[str, Any], served: np.ndarray, y: np.ndarray, labels: list[str], path: Path) -> Path:
    curves, marks = {}, {}
    for name in report["targets"]:
        i = labels.index(name)
        c = decisions.curve(served, y, i)
        curves[name] = {"coverage": c["coverage"].tolist(), "precision": c["precision"].tolist()}
        val, oof, argmax = report["val"][name], report["oof"][name], report["argmax_scalars"]
        folds = oof["precision_folds"]
        marks[name] = {
            "threshold": report["thresholds"][name],
            "coverage": val.get("coverage"),
            "precision": val.get("precision"),
            "oof_precision": oof["precision"],
            "oof_coverage": oof["coverage"],
            "oof_range": (folds["min"], folds["max"]) if folds["folds"] else (oof["precision"], oof["precision"]),
            "argmax_precision": argmax.get(f"val_precision_{name}"),
            "argmax_coverage": argmax.get(f"val_coverage_{name}"),
        }
    title = f"Precision against coverage: val ({report['rows']} rows), {report['folds']}-fold out of fold"
    return precision_coverage(curves, report["targets"], marks, path, title)


def passed(gates: dict[str, dict[str, Any]]) -> bool:
    return all(g["passed"] is not False for g in gates.values())


def mlflow_scalars(report: dict[str, Any]) -> dict[str, float]:
    """``decision.val_precision_long`` (out of fold), ``decision.test_precision_long``, ``decision.threshold_long``
    (an unreachable target has none)."""
    return {
        **{f"decision.{k}": v for k, v in report["scalars"].items()},
        **{f"decision.{k}": v for k, v in report.get("test", {}).get("scalars", {}).items()},
        **{f"decision.threshold_{k}": t for k, t in report["thresholds"].items() if t is not None},
    }


def test_decisions(
    conf: ClassificationConf,
    report: dict[str, Any],
    served: np.ndarray,
    y: np.ndarray,
    ctx: RunContext,
) -> dict[str, Any]:
    """The test split decided once with the exported thresholds: ``test_*`` scalars and the gates on them, beside
    argmax's of the same served probabilities on the same rows."""
    labels = list(conf.data.labels)
    decided, _ = decisions.decide(served, *decisions.thresholds_by_index(report, labels))
    scalars = decisions.scalars(decided, y, labels, list(report["targets"]), "test_")
    gates = {"test_" + k.removeprefix("val_"): rule for k, rule in (conf.trainer.gates or {}).items()}
    argmax = decisions.scalars(served.argmax(axis=1), y, labels, list(report["targets"]), "test_")
    report = {
        **report,
        "test": {
            "rows": len(y),
            "scalars": scalars,
            "argmax_scalars": argmax,
            "gates": evaluate_gates(scalars, gates),
            "argmax_gates": evaluate_gates(argmax, gates),
        },
    }
    ctx.tracker.log_metrics({f"decision.{k}": v for k, v in scalars.items()})
    return report
