"""``loralab-compare target=<sweep dir | experiment>``: the runs of a sweep or an experiment as a table, best first."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from loralab.cli.args import RUN_ERRORS, Tool, option, run

DESCRIPTION = (
    "Show the runs of one sweep (a multirun dir, or a job dir inside it) or of a whole MLflow experiment "
    "as one table, best objective first: each job's swept values, status, objective, per-class F1 and "
    "error. The same rows as the summary a sweep logs on its MLflow parent run. The target may also be "
    "given bare: loralab-compare multirun/2026-11-21/07-00-00."
)


@dataclass
class CompareArgs:
    target: str = option(help="a multirun sweep dir (or a job dir inside it) or an MLflow experiment name")
    tracking_uri: str | None = option(
        None,
        "MLflow store; null: a sweep's own store, else $MLFLOW_TRACKING_URI, "
        "else sqlite:///<$LORALAB_ROOT or cwd>/mlflow.db",
    )


TOOL = Tool("loralab-compare", DESCRIPTION, CompareArgs, positional="target")


def default_store() -> str:
    """The store a run from here uses by default: ``$MLFLOW_TRACKING_URI``, else ``mlflow.db`` in ``$LORALAB_ROOT``
    or the current directory (``conf/tracking/mlflow.yaml``)."""
    root = Path(os.environ.get("LORALAB_ROOT") or Path.cwd())
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root.resolve() / 'mlflow.db'}"


def check_store(uri: str) -> None:
    """A SQLite store must exist: opening a missing one would create it, empty, and report no runs."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        raise LookupError(
            f"no MLflow store at {uri} (no such file); give tracking_uri=sqlite:///<path to mlflow.db>, "
            f"set MLFLOW_TRACKING_URI, or run from the directory holding mlflow.db"
        )


def target_rows(target: str | Path, tracking_uri: str | None = None) -> tuple[list[dict[str, Any]], str]:
    """Rows and a title for a sweep dir (or a job dir inside it: the parent record is looked up upwards) or an
    MLflow experiment name (at ``tracking_uri``, default ``default_store()``). LookupError if neither."""
    from loralab.reporting.runs import experiment_rows, sweep_rows
    from loralab.tracking.sweep import read_parent

    path = Path(target)
    if path.is_dir():
        record = next((r for d in (path, *path.resolve().parents) if (r := read_parent(d))), None)
        if record is None:
            raise LookupError(f"{path} holds no sweep parent record (was it run with train.py -m?)")
        uri = tracking_uri or record["uri"]
        check_store(uri)
        return sweep_rows(uri, record["run_id"]), f"sweep {path} (parent run {record['run_id']} at {uri})"
    uri = tracking_uri or default_store()
    check_store(uri)
    return experiment_rows(uri, str(target)), f"experiment {target} at {uri}"


def compare_runs(args: CompareArgs) -> int:
    from loralab.reporting.compare import print_table

    rows, title = target_rows(args.target, args.tracking_uri)
    if not rows:
        print(f"no runs for {title}", file=sys.stderr)
        return 1
    print_table(rows, title)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(TOOL, compare_runs, argv, errors=(*RUN_ERRORS, LookupError))


if __name__ == "__main__":
    sys.exit(main())
