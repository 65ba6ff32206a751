"""What a person reads in the terminal at the end of a run."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def print_summary(summary: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    m = summary["metrics"]
    table = Table(title=f"best epoch {summary['best_epoch']} of {summary['epochs_run']} — {summary['stop_reason']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("gate")
    for key, value in m.items():
        if isinstance(value, float):
            gate = m["gates"].get(key)
            mark = "" if gate is None else {True: "[green]pass[/]", False: "[red]FAIL[/]", None: "skipped"}[
                gate["passed"]] + f" ({gate['rule']})"
            table.add_row(key, f"{value:.4f}", mark)
    console.print(table)
    console.print(f"train {summary['train_samples_per_s']:.0f} samples/s on {summary['device']}, "
                  f"wall {summary['wall_time_s']:.0f} s")
    console.print(f"run dir: {summary['run_dir']}")
    if summary.get("run_id"):
        console.print(f"MLflow run {summary['run_id']} — mlflow ui --backend-store-uri {summary['tracking_uri']}")
