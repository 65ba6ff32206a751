"""``loralab-compare target=<sweep dir | experiment>``: the runs of a sweep or an experiment as a table, best first."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Sequence

from loralab.cli.args import RUN_ERRORS, Tool, option, run

DESCRIPTION = ("Show the runs of one sweep (a multirun dir, or a job dir inside it) or of a whole MLflow experiment "
               "as one table, best objective first: each job's swept values, status, objective, per-class F1 and "
               "error. The same rows as the summary a sweep logs on its MLflow parent run. The target may also be "
               "given bare: loralab-compare multirun/2026-11-21/07-00-00.")


@dataclass
class CompareArgs:
    target: str = option(help="a multirun sweep dir (or a job dir inside it) or an MLflow experiment name")
    tracking_uri: str | None = option(None, "MLflow store; null: $MLFLOW_TRACKING_URI, else the sweep's own store "
                                            "or sqlite:///<cwd>/mlflow.db")


TOOL = Tool("loralab-compare", DESCRIPTION, CompareArgs, positional="target")


def compare_runs(args: CompareArgs) -> int:
    from loralab.reporting.compare import print_table, target_rows  # mlflow loads only when there is work to do

    rows, title = target_rows(args.target, args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    if not rows:
        print(f"no runs for {args.target}", file=sys.stderr)
        return 1
    print_table(rows, title)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(TOOL, compare_runs, argv, errors=(*RUN_ERRORS, LookupError))


if __name__ == "__main__":
    sys.exit(main())
