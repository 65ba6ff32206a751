"""What a person reads in the terminal: the resolved config at the start, a summary table at the end, or — in
quiet mode (sweeps) — one line per run."""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from loralab.result import RunResult

GATE_MARK = {True: "[green]pass[/]", False: "[red]FAIL[/]", None: "skipped"}


def is_quiet(setting: Any, multirun: bool) -> bool:
    """``quiet: auto`` is quiet in a Hydra multirun (a sweep of 50 runs must not print 50 config trees)."""
    return multirun if str(setting).lower() == "auto" else bool(setting)


def quiet_logging() -> None:
    """Raise the root logger's terminal handlers to WARNING; file handlers (the run's log file) keep everything.

    Also silences transformers' progress bars (checkpoint writing) for the process.
    """
    from transformers.utils import logging as hf_logging

    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:  # exact type: FileHandler subclasses StreamHandler
            handler.setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()


def _overridden(path: str, overrides: Sequence[str]) -> bool:
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    return any(path == k or path.startswith(k + ".") for k in keys)


def config_tree(config: Mapping[str, Any], overrides: Sequence[str] = (), label: str = "config") -> Tree:
    """The resolved config as a tree; keys set on the command line (or inside an overridden group) in yellow."""
    tree = Tree(f"[bold]{label}[/]")

    def add(node: Tree, mapping: Mapping[str, Any], prefix: str) -> None:
        for key, value in mapping.items():
            path = f"{prefix}{key}"
            style = "yellow" if _overridden(path, overrides) else ""
            if isinstance(value, Mapping) and value:
                add(
                    node.add(f"[bold {style}]{escape(str(key))}[/]" if style else f"[bold]{escape(str(key))}[/]"),
                    value,
                    path + ".",
                )
            else:
                text = f"{escape(str(key))}: {escape(repr(value) if isinstance(value, str) else str(value))}"
                node.add(f"[{style}]{text}[/]" if style else text)

    add(tree, config, "")
    return tree


def print_config(config: Mapping[str, Any], overrides: Sequence[str] = (), console: Console | None = None) -> None:
    console = console or Console()
    console.print(config_tree(config, overrides))


LOSES_BY = 0.05  # macro-F1 below the baseline that a run's summary calls a loss in so many words


def baseline_verdict(metrics: Mapping[str, Any]) -> str | None:
    """One plain line when the model trails the in-run baseline by more than ``LOSES_BY`` macro-F1, else None; a run
    that did not blend is told the override that serves the two together."""
    base = (metrics.get("baseline") or {}).get("scalars", {}).get("val_macro_f1")
    model = metrics.get("val_macro_f1")
    if base is None or model is None or base - model <= LOSES_BY:
        return None
    name = metrics["baseline"]["name"]
    remedy = "" if metrics.get("ensemble") else f" (ensemble=blend serves the model and the {name} baseline together)"
    return (
        f"The model loses to the {name} baseline by {base - model:.3f} macro-F1 ({model:.3f} vs {base:.3f}): "
        f"on this data the {name} baseline is the better model{remedy}."
    )


def ensemble_line(metrics: Mapping[str, Any]) -> str | None:
    """``ensemble=blend``: out-of-fold macro-F1 of model, baseline and blend on val, and what the export serves."""
    e = metrics.get("ensemble")
    if not e:
        return None
    oof = {who: s["macro_f1"] for who, s in e["oof"].items()}
    test = {who: s["macro_f1"] for who, s in e.get("test", {}).items()}
    return (
        f"ensemble ({e['folds']}-fold out-of-fold on val): macro-F1 model {oof['model']:.4f}, baseline "
        f"{oof['baseline']:.4f}, blend {oof['blend']:.4f}; the export serves {e['choice']} (model weight "
        f"{e['weight']:g})"
        + (
            f"; test macro-F1 model {test['model']:.4f}, baseline {test['baseline']:.4f}, blend {test['blend']:.4f}"
            if test
            else ""
        )
    )


def _value(v: Any) -> str:
    return "—" if v is None else f"{v:.3f}"


def decision_rows(metrics: Mapping[str, Any], sep: str = "\n") -> tuple[list[str], list[list[str]]]:
    """``decision=precision``: per acting label (its target after ``sep``) the exported threshold, the out-of-fold
    precision (after ``sep``, its fold min–max) and coverage on val, argmax's precision and coverage on the same
    held-out rows, and the test split's with the exported thresholds. Header and rows of text, for console and
    report."""
    d = metrics["decision"]
    test = d.get("test")
    header = [
        f"label{sep}(target)",
        f"acts at{sep}p >=",
        f"oof{sep}prec.",
        f"oof{sep}cov.",
        f"argmax{sep}prec.",
        f"argmax{sep}cov.",
        *([f"test{sep}prec.", f"test{sep}cov."] if test else []),
    ]
    rows = []
    for name, target in d["targets"].items():
        o, f, a = d["oof"][name], d["oof"][name]["precision_folds"], d["argmax_scalars"]
        t = d["thresholds"][name]
        folds = "none acted" if not f["folds"] else f"{f['min']:.2f}–{f['max']:.2f}"
        rows.append(
            [
                f"{name}{sep}({target:.2f})",
                "never" if t is None else f"{t:.3f}",
                f"{_value(o['precision'])}{sep}{folds}",
                _value(o["coverage"]),
                _value(a.get(f"val_precision_{name}")),
                _value(a.get(f"val_coverage_{name}")),
                *(
                    [
                        _value(test["scalars"].get(f"test_precision_{name}")),
                        _value(test["scalars"][f"test_coverage_{name}"]),
                    ]
                    if test
                    else []
                ),
            ]
        )
    return header, rows


def gate_count(gates: Mapping[str, Mapping[str, Any]]) -> str:
    verdicts = [g["passed"] for g in gates.values()]
    return f"{verdicts.count(True)} pass, {verdicts.count(False)} FAIL, {verdicts.count(None)} skipped"


def decision_lines(metrics: Mapping[str, Any]) -> list[str]:
    """The plain sentences under the decisions table: the rule, each unreachable target, and the gates of argmax
    and of the decisions on val (decisions: out of fold) and on test."""
    from loralab.decisions import unreachable_line

    d = metrics["decision"]
    lines = [
        f"decision=precision ({d['folds']}-fold out of fold on {d['rows']} val rows; thresholds exported from all "
        f"of val): {d['rule']}, fallback {d['fallback']}",
        *(unreachable_line(name, d) for name, t in d["thresholds"].items() if t is None),
        f"val argmax gates: {gate_count(metrics.get('gates', {}))}; val decision gates (out of fold): "
        f"{gate_count(d['gates'])}",
    ]
    if test := d.get("test"):
        lines.append(
            f"test argmax gates: {gate_count(test['argmax_gates'])}; test decision gates: {gate_count(test['gates'])}"
        )
    return lines


def _gate_text(gate: Mapping[str, Any] | None) -> str:
    return "" if gate is None else f"{GATE_MARK[gate['passed']]} ({escape(str(gate['rule']))})"


def best_point(result: RunResult) -> str:
    """Where the best evaluation was: an epoch end, or a val check inside an epoch (``trainer.val_check_interval``,
    ``max_steps``)."""
    step = result.best_step
    if step is None or any(h.get("step") == step for h in result.history):
        return f"epoch {result.best_epoch}"
    return f"step {step} in epoch {result.best_epoch}"


def test_value(metrics: Mapping[str, Any], key: str) -> float | None:
    """The test split's counterpart of a ``val_*`` metric (``test_*``), when the run scored one."""
    return metrics.get(f"test_{key[4:]}") if key.startswith("val_") else None


def print_summary(result: RunResult, console: Console | None = None) -> None:
    """Metrics with gates, the test split and the baseline, the artifacts written, and how to open the run in
    MLflow."""
    console = console or Console()
    m = result.metrics
    gates = m.get("gates", {})
    baseline = m.get("baseline") or {}
    base_scalars = baseline.get("scalars", {})
    test_rows = (m.get("test") or {}).get("rows", m.get("test_rows"))  # classification | regression
    has_test = test_rows is not None
    table = Table(title=f"best {best_point(result)} of {result.epochs_run} epochs — {result.stop_reason}")
    table.add_column("metric")
    table.add_column("model", justify="right")
    if has_test:
        table.add_column(f"test ({test_rows} rows)", justify="right")
    if baseline:
        table.add_column(f"baseline ({baseline['name']})", justify="right")
    table.add_column("gate")
    for key, value in m.items():
        if isinstance(value, float) and not key.startswith("test_"):
            test = [f"{test_value(m, key):.4f}" if test_value(m, key) is not None else ""] if has_test else []
            base = [f"{base_scalars[key]:.4f}" if key in base_scalars else ""] if baseline else []
            table.add_row(key, f"{value:.4f}", *test, *base, _gate_text(gates.get(key)))
    for key, gate in gates.items():  # gated metrics this run has no value for (class absent from val)
        if key not in m:
            table.add_row(key, "—", *([""] if has_test else []), *([""] if baseline else []), _gate_text(gate))
    console.print(table)
    verdicts = [g["passed"] for g in gates.values()]
    console.print(
        f"gates: {verdicts.count(True)} pass, {verdicts.count(False)} FAIL, {verdicts.count(None)} skipped"
        + (
            f"; model − baseline macro-F1 {m['val_macro_f1'] - base_scalars['val_macro_f1']:+.4f}"
            if "val_macro_f1" in base_scalars
            else ""
        )
    )
    verdict = baseline_verdict(m)
    if verdict:
        console.print(f"[bold red]{escape(verdict)}[/]")
    if ensemble := ensemble_line(m):
        console.print(escape(ensemble), soft_wrap=True)
    if m.get("decision"):
        header, rows = decision_rows(m)
        decisions = Table(title="decisions (prec. = precision, cov. = share of rows acting; oof = out of fold on val)")
        for name in header:
            decisions.add_column(name, justify="left" if name == header[0] else "right")
        for values in rows:
            decisions.add_row(*values)
        console.print(decisions)
        for line in decision_lines(m):
            style = "bold red" if "cannot reach" in line else ""
            console.print(f"[{style}]{escape(line)}[/]" if style else escape(line), soft_wrap=True)
    console.print(
        f"train {result.train_samples_per_s:.0f} samples/s on {result.device}{padding_text(result)}, "
        f"wall {result.wall_time_s:.0f} s" + (f": {result.stage_line()}" if result.stage_seconds else "")
    )
    console.print(f"run dir: {result.run_dir}", soft_wrap=True)
    for path in result.artifacts:
        console.print(f"  {escape(str(path))}", soft_wrap=True, highlight=False)
    if result.run_id:
        console.print(
            f"MLflow run {result.run_id} — mlflow ui --backend-store-uri {result.tracking_uri}", soft_wrap=True
        )


def padding_text(result: RunResult) -> str:
    """``, 23% of train tokens padding (packed away)``: what padded batches spend on pad tokens; empty when the
    task has no token lengths."""
    if "train" not in result.padding_share:
        return ""
    fate = "packed away" if result.packing else "hardware.packing=true leaves it out"
    return f", {100 * result.padding_share['train']:.0f}% of train tokens padding ({fate})"


def run_line(result: RunResult, job: int | None = None) -> str:
    """The one line quiet mode prints per run: objective, baseline, gates, time, where to look."""
    m = result.metrics
    verdicts = [g["passed"] for g in m.get("gates", {}).values()]
    base = (m.get("baseline") or {}).get("scalars", {}).get("val_macro_f1")
    parts = [
        f"run {job}" if job is not None else "run",
        f"{result.objective_key} {result.objective:.4f} ({best_point(result)}, {result.epochs_run} epochs)",
        (f"baseline macro-F1 {base:.4f}" + (" (model LOSES by more than 0.05)" if baseline_verdict(m) else ""))
        if base is not None
        else "no baseline",
        *(
            [
                f"ensemble {m['ensemble']['choice']} w={m['ensemble']['weight']:g} oof macro-F1 "
                f"{m['ensemble']['oof']['blend']['macro_f1']:.4f}"
            ]
            if m.get("ensemble")
            else []
        ),
        f"gates {verdicts.count(True)}/{len(verdicts)} pass",
        f"{result.wall_time_s:.0f} s",
        str(result.run_dir),
    ]
    if result.run_id:
        parts.append(f"mlflow {result.run_id}")
    return " | ".join(parts)


def print_run_line(result: RunResult, job: int | None = None, console: Console | None = None) -> None:
    (console or Console()).print(run_line(result, job), soft_wrap=True, highlight=False, markup=False)
