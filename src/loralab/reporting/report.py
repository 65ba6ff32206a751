"""``report.md``: what a colleague reads about a run — how it was configured, what the data looked like, how the
model scored against the gates and the scikit-learn baseline, and the plots. Built from the run dir's files."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import OmegaConf

from loralab.fs import atomic_write_text
from loralab.reporting.console import (
    baseline_verdict,
    best_point,
    decision_lines,
    decision_rows,
    ensemble_line,
    test_value,
)
from loralab.reporting.plots import make_plots
from loralab.result import RunResult

log = logging.getLogger(__name__)

RELIABILITY = "plots/reliability_diagram.png"  # written by calibration when it runs
STATUS = {True: "pass", False: "**FAIL**", None: "skipped"}
PLOT_TITLES = {
    "loss_curves": "Loss per epoch",
    "f1_curves": "Validation F1 per epoch",
    "confusion_matrix": "Confusion matrix (best epoch)",
    "class_distribution": "Class distribution",
    "baseline_confusion_matrix": "Baseline confusion matrix",
    "reliability_diagram": "Reliability diagram",
    "precision_coverage": "Precision against coverage (decision=precision)",
}
PRECISION_COVERAGE = "plots/precision_coverage.png"  # written by decision=precision


def hydra_overrides(run_dir: Path) -> list[str] | None:
    """The command-line overrides Hydra saved for this run; None when the run did not go through Hydra."""
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    return list(OmegaConf.load(path)) if path.is_file() else None


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v).replace("|", "\\|"))

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows] + [""]


def _data_section(data_report: Mapping[str, Any]) -> list[str]:
    out = ["## Data", ""]
    files = [(name, data_report[name]) for name in ("train_file", "val_file", "test_file") if name in data_report]
    out += _table(
        ["file", "path", "rows read", "kept", "dropped"],
        [(name, f"`{f['path']}`", f["rows_read"], f["rows_kept"], f["rows_dropped"]) for name, f in files],
    )
    drops = [
        (name, reason, n, f["first_line_by_reason"].get(reason))
        for name, f in files
        for reason, n in f["dropped_by_reason"].items()
    ]
    if drops:
        out += ["Dropped rows by reason:", ""] + _table(["file", "reason", "rows", "first line"], drops)
    if "val_from_train" in data_report and "seed" in data_report["val_from_train"]:
        v = data_report["val_from_train"]
        out += [f"Validation carved from the train file: {v['val_split']:.0%} stratified, seed {v['seed']}.", ""]
    out += _time_lines(data_report.get("time_split"))
    counts = data_report.get("class_counts")
    if not counts:
        return out
    splits = [s for s in ("train_before_oversampling", "train_after_oversampling", "val", "test") if s in counts]
    out += ["Class counts:", ""] + _table(
        ["class", *(s.replace("_", " ") for s in splits)],
        [(label, *(counts[s][label] for s in splits)) for label in counts["val"]],
    )
    leak = data_report.get("leakage", {})
    out += [
        f"Oversampled: {'yes' if data_report.get('oversampled') else 'no'}. "
        f"Ids in both train and val: {leak.get('ids_in_both', 0)} (policy: {leak.get('policy', 'n/a')}).",
        "",
    ]
    return out


def _time_lines(t: Mapping[str, Any] | None) -> list[str]:
    """data.split=time | walk_forward (or a time_key): each split's time range, what the purge and embargo cost."""
    if not t:
        return []
    how = {
        "random": "random (times read for the ranges only)",
        "time": "time: val is the last rows in time",
        "walk_forward": f"walk-forward: val is block {t.get('fold')} of {t.get('folds')}, trained on the blocks before",
    }[t["split"]]
    out = [f"Split {how}; times from {t['time_key'] or 'file order'} ({t['times']}).", ""]
    out += _table(
        ["split", "rows", "first", "last"], [(s, t[s]["rows"], t[s]["first"], t[s]["last"]) for s in ("train", "val")]
    )
    out += [
        f"Purged {t['purged']} train rows (label_horizon {t['label_horizon']}, purge {str(t['purge']).lower()}), "
        f"embargoed {t['embargoed']} (embargo {t['embargo']}), {t['dropped_by_max_train']} beyond max_train.",
        "",
    ]
    late = t.get("overlap", {}).get("train_rows_at_or_after_val_start")
    if late:
        out += [f"**Train and val files overlap in time**: {late} train rows at or after the val file's start.", ""]
    return out


def _metrics_section(metrics: Mapping[str, Any]) -> list[str]:
    baseline = metrics.get("baseline") or {}
    base_scalars = baseline.get("scalars", {})
    gates = metrics.get("gates", {})
    name = baseline.get("name")
    base_col = [f"baseline ({name})"] if name else []
    test = metrics.get("test")
    test_col = ["test"] if test else []
    out = [f"## Metrics (validation, best epoch {metrics.get('best_epoch')})", ""]
    rows = []
    for key, value in metrics.items():
        if not isinstance(value, float) or key.startswith("test_"):
            continue
        gate = gates.get(key)
        rows.append(
            (
                key,
                value,
                *([test_value(metrics, key)] if test else []),
                *([base_scalars.get(key)] if name else []),
                gate["rule"] if gate else "",
                STATUS[gate["passed"]] if gate else "",
            )
        )
    for key, gate in gates.items():  # gates on metrics this run has no value for (class absent)
        if key not in metrics:
            rows.append(
                (
                    key,
                    None,
                    *([None] if test else []),
                    *([base_scalars.get(key)] if name else []),
                    gate["rule"],
                    STATUS[gate["passed"]],
                )
            )
    out += _table(["metric", "model", *test_col, *base_col, "gate", "status"], rows)
    if test:
        out += [
            f"Test: {test['rows']} rows of `{test['file']}`, scored once with the final model (temperature "
            f"{test['temperature']:.4f} fit on val); {test['use']}.",
            "",
        ]
    if baseline:
        out += [
            f"Baseline: {name} fit on the {baseline['train_rows']} train rows before oversampling in "
            f"{baseline['fit_time_s']:.2f} s, scored on the same val split.",
            "",
        ]
    per_class = metrics.get("per_class")
    if not per_class:
        return out
    base_pc = baseline.get("per_class", {})
    out += ["Per class:", ""] + _table(
        ["class", "precision", "recall", "F1", "support", *(["baseline F1"] if name else [])],
        [
            (label, c["precision"], c["recall"], c["f1"], c["support"], *([base_pc[label]["f1"]] if name else []))
            for label, c in per_class.items()
        ],
    )
    return out


def _ensemble_section(metrics: Mapping[str, Any]) -> list[str]:
    """``ensemble=blend``: model, baseline and blend side by side, out of fold on val, and what the export serves."""
    e = metrics.get("ensemble")
    if not e:
        return []
    out = ["## Ensemble (model + baseline blend)", "", ensemble_line(metrics) + ".", ""]
    test = e.get("test", {})
    out += _table(
        ["", "out-of-fold macro-F1", "accuracy", "log-loss", *(["test macro-F1"] if test else [])],
        [
            (who, s["macro_f1"], s["accuracy"], s["log_loss"], *([test[who]["macro_f1"]] if test else []))
            for who, s in e["oof"].items()
        ],
    )
    out += [
        f"Blend: softmax(w·log p_model + (1−w)·log p_baseline), w on a grid of {len(e['grid'])} from 0 to 1 "
        f"chosen by {e['select']}. Out of fold: the {e['rows']} val rows in {e['folds']} "
        f"{_fold_kind(e)}, each "
        f"scored with the temperatures (model and baseline) and the weight fit on the other folds (fold weights "
        f"{', '.join(f'{w:g}' for w in e['fold_weights'])}); the exported weight {e['weight']:g} and baseline "
        f"temperature {e['baseline_temperature']:.3f} are chosen on the whole val split. The gates above judge "
        f"the learned model itself.",
        "",
    ]
    return out


def _fold_kind(e: Mapping[str, Any]) -> str:
    t = e.get("time_folds")
    if t is None:
        return "stratified folds"
    return f"contiguous time blocks ({t['purged']} purged and {t['embargoed']} embargoed rows left out of the fits)"


def _decision_section(metrics: Mapping[str, Any]) -> list[str]:
    """``decision=precision``: thresholds, out-of-fold precision with its fold range, argmax's, test, and the gates
    of argmax and of the decisions side by side."""
    d = metrics.get("decision")
    if not d:
        return []
    header, rows = decision_rows(metrics, sep=" ")
    out = [
        "## Decisions",
        "",
        "prec. = precision, cov. = coverage (share of rows acting), oof = out of fold on val.",
        "",
    ]
    out += _table(header, rows)
    out += [line + "." for line in decision_lines(metrics)] + [""]
    test = d.get("test", {})
    gates = metrics.get("gates", {})

    def cell(gate: Mapping[str, Any] | None) -> str:
        if gate is None:
            return ""
        return STATUS[gate["passed"]] if gate["value"] is None else f"{gate['value']:.3f} {STATUS[gate['passed']]}"

    gate_rows = [
        (
            key,
            rule,
            cell(gates.get(key)),
            cell(d["gates"][key]),
            *([cell(test["argmax_gates"].get(t)), cell(test["gates"].get(t))] if test else []),
        )
        for key, rule, t in ((k, g["rule"], "test_" + k.removeprefix("val_")) for k, g in d["gates"].items())
    ]
    out += _table(
        ["gate", "rule", "argmax val", "decisions val (oof)", *(["argmax test", "decisions test"] if test else [])],
        gate_rows,
    )
    out += [
        "Out of fold: each val fold is decided with the calibration and thresholds fit on the other folds; the "
        "exported thresholds are chosen on all of val, where they reach their targets by construction, so the "
        "out-of-fold and test columns are the ones to trust (docs/decisions.md).",
        "",
    ]
    return out


def render_report(
    *,
    metrics: Mapping[str, Any],
    data_report: Mapping[str, Any],
    result: RunResult,
    plots: Mapping[str, str],
    overrides: Sequence[str] | None,
    run_id: str | None,
    tracking_uri: str | None,
    run_dir: str,
) -> str:
    """The report's Markdown; ``plots`` maps a plot name to its path relative to the run dir."""
    out = ["# Run report", ""]
    verdicts = [g["passed"] for g in metrics.get("gates", {}).values()]
    baseline = metrics.get("baseline") or {}
    base_f1 = baseline.get("scalars", {}).get("val_macro_f1")
    verdict = baseline_verdict(metrics)
    if verdict:
        out += [f"**{verdict}**", ""]
    out += _table(
        ["", ""],
        [
            ("objective", f"{result.objective_key} = {result.objective:.4f}"),
            ("gates", f"{verdicts.count(True)} pass, {verdicts.count(False)} FAIL, {verdicts.count(None)} skipped"),
            (
                "baseline",
                f"{baseline['name']} val_macro_f1 = {base_f1:.4f} (model − baseline: "
                f"{metrics['val_macro_f1'] - base_f1:+.4f})"
                if base_f1 is not None
                else "none",
            ),
            ("run dir", f"`{run_dir}`"),
            ("MLflow run", f"`{run_id}`" if run_id else "tracking disabled"),
            ("MLflow UI", f"`mlflow ui --backend-store-uri {tracking_uri}`" if run_id else ""),
            *(
                [
                    (
                        "test",
                        f"test_macro_f1 = {metrics['test_macro_f1']:.4f} on {metrics['test']['rows']} rows, scored "
                        f"once after training",
                    )
                ]
                if "test_macro_f1" in metrics
                else []
            ),
            ("best", f"{best_point(result)} of {result.epochs_run} epochs ({result.stop_reason})"),
            (
                "time",
                f"{result.wall_time_s:.0f} s wall, {result.train_samples_per_s:.0f} train samples/s on {result.device}",
            ),
        ],
    )
    out += ["## Config overrides", ""]
    if overrides is None:
        out += ["Not run through Hydra: no overrides recorded.", ""]
    else:
        out += ["```", *(overrides or ["(none: defaults only)"]), "```", ""]
    out += _data_section(data_report) + _metrics_section(metrics) + _ensemble_section(metrics)
    out += _decision_section(metrics)
    out += ["## Plots", ""]
    for name, rel in plots.items():
        out += [f"### {PLOT_TITLES.get(name, name)}", "", f"![{name}]({rel})", ""]
    return "\n".join(out)


def write_reports(
    run_dir: Path,
    labels: Sequence[str],
    result: RunResult,
    metrics: Mapping[str, Any],
    data_report: Mapping[str, Any],
    tracker,
) -> list[Path]:
    """Plots and report.md into the run dir, both sent to MLflow; returns the files written."""
    run_dir = Path(run_dir)
    paths = make_plots(run_dir / "plots", result.history, metrics, data_report.get("class_counts"), labels)
    if (run_dir / RELIABILITY).is_file():
        paths["reliability_diagram"] = run_dir / RELIABILITY
    if (run_dir / PRECISION_COVERAGE).is_file() and metrics.get("decision"):
        paths["precision_coverage"] = run_dir / PRECISION_COVERAGE
    text = render_report(
        metrics=metrics,
        data_report=data_report,
        result=result,
        plots={k: p.relative_to(run_dir).as_posix() for k, p in paths.items()},
        overrides=hydra_overrides(run_dir),
        run_id=tracker.run_id,
        tracking_uri=tracker.uri,
        run_dir=str(run_dir),
    )
    report = atomic_write_text(run_dir / "report.md", text)
    tracker.log_artifact(run_dir / "plots")  # the report's relative links resolve in MLflow's artifact view too
    tracker.log_artifact(report)
    log.info("wrote %s", report)
    return [report, *paths.values()]
