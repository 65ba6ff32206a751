"""Rows of runs from MLflow: one dict per job (overrides, status, objective, per-class F1, error), best first.

The rows come from ``mlflow.search_runs`` (a DataFrame: ``metrics.*``, ``params.*``, ``tags.*`` columns), as a user
would query them. The end-of-sweep summary and ``loralab-compare`` render the same rows (``reporting.compare``), so
the terminal and the MLflow artifact never disagree.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any, Iterator, Mapping, Sequence

import mlflow
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

OVERRIDES_TAG = "loralab.overrides"  # JSON list of a job's Hydra overrides (set on sweep children)
F1_PREFIX = "best.val_f1_"  # per-class F1 of the best epoch, as run.py logs it
# What ran beside the model, as columns where any run logged it: the in-run baseline, and the blend's out-of-fold
# macro-F1 (ensemble=blend) next to the model's own out-of-fold score, so a sweep shows what the blend added.
BESIDE = {
    "baseline_macro_f1": "baseline.val_macro_f1",
    "model_oof_f1": "ensemble.model.oof_macro_f1",
    "blend_oof_f1": "ensemble.blend.oof_macro_f1",
    "blend_weight": "ensemble.weight",
}
MAX_RUNS = 5000
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


@contextlib.contextmanager
def using_store(uri: str) -> Iterator[None]:
    """MLflow's fluent API (``search_runs``, model logging and registering) on ``uri`` for the block only. It reads
    a process-wide tracking URI, and ``mlflow.set_tracking_uri`` also exports it as ``$MLFLOW_TRACKING_URI``
    (which the next run's config would then read): both are put back as they were. The registry follows the
    tracking URI unless ``$MLFLOW_REGISTRY_URI`` says otherwise."""
    env = os.environ.get(TRACKING_URI_ENV)
    before = mlflow.get_tracking_uri() if mlflow.tracking.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None if before == env else before)  # None: back to $MLFLOW_TRACKING_URI/default
        if env is None:
            os.environ.pop(TRACKING_URI_ENV, None)
        else:
            os.environ[TRACKING_URI_ENV] = env


def search(uri: str, experiment_ids: list[str], filter_string: str = "") -> list[dict[str, Any]]:
    """``mlflow.search_runs`` on ``uri``, one dict per run (its DataFrame's records)."""
    with using_store(uri):
        frame = mlflow.search_runs(experiment_ids, filter_string, max_results=MAX_RUNS, output_format="pandas")
    return frame.to_dict("records")


def child_runs(client: MlflowClient, parent_id: str) -> list[Run]:
    exp_id = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=MAX_RUNS)


def _overrides(tags: Mapping[str, str]) -> list[str]:
    if OVERRIDES_TAG in tags:
        return json.loads(tags[OVERRIDES_TAG])
    text = tags.get("hydra.overrides", "")
    return [] if text in ("", "(none)") else text.split(" ")


def override_values(overrides: Sequence[str]) -> dict[str, str]:
    """``["+a.b=1", "c=x"]`` → ``{"a.b": "1", "c": "x"}`` (Hydra's add/delete prefixes dropped)."""
    return dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)


def _section(record: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """``{name: value}`` of one ``search_runs`` record's ``metrics.``/``params.``/``tags.`` columns; a run without
    the column reads NaN or None there (another run has it), which is no value."""
    prefix = f"{kind}."
    return {
        k[len(prefix) :]: v
        for k, v in record.items()
        if k.startswith(prefix) and v is not None and not (isinstance(v, float) and math.isnan(v))
    }


def run_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """A table row from one ``search_runs`` record."""
    tags, params, metrics = (_section(record, kind) for kind in ("tags", "params", "metrics"))
    key = params.get("objective", "val_macro_f1")
    overrides = _overrides(tags)
    return {
        "job": int(tags["hydra.job.num"]) if tags.get("hydra.job.num", "").isdigit() else None,
        "run_name": tags.get("mlflow.runName", ""),
        "overrides": " ".join(overrides),
        "override_values": override_values(overrides),
        "status": record["status"],
        "objective_key": key,
        "objective": metrics.get(f"best.{key}", math.nan),
        "mode": params.get("trainer.monitor_mode", "max"),
        "f1": {k[len(F1_PREFIX) :]: v for k, v in sorted(metrics.items()) if k.startswith(F1_PREFIX)},
        "beside": {name: metrics[key] for name, key in BESIDE.items() if key in metrics},
        "error": tags.get("error", ""),
        "run_id": record["run_id"],
    }


def sort_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best objective first (direction from ``trainer.monitor_mode``); runs without one last, by job."""

    def key(row):
        value = row["objective"]
        missing = math.isnan(value)
        return (missing, 0.0 if missing else (-value if row["mode"] == "max" else value), row["job"] or 0)

    return sorted(rows, key=key)


def sweep_rows(uri: str, parent_id: str) -> list[dict[str, Any]]:
    """The children of sweep parent ``parent_id`` in the store at ``uri``, best first."""
    exp_id = MlflowClient(uri).get_run(parent_id).info.experiment_id
    return sort_rows([run_row(r) for r in search(uri, [exp_id], f"tags.mlflow.parentRunId = '{parent_id}'")])


def experiment_rows(uri: str, experiment: str) -> list[dict[str, Any]]:
    """Every run of an experiment except sweep parents (their children are listed instead), best first."""
    exp = MlflowClient(uri).get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no MLflow experiment {experiment!r} at {uri}")
    return sort_rows([run_row(r) for r in search(uri, [exp.experiment_id]) if r.get("tags.loralab.role") != "sweep"])
