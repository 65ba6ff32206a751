"""A sweep is one MLflow parent run with one child run per Hydra job.

Jobs may run in this process, in joblib workers or on SLURM nodes, so none can rely on another's memory: they find
the parent through a small JSON file in the sweep dir, created once under a file lock (whoever comes first creates
the run, everyone else reads its id). The Hydra callback opens the parent before the first job and, after the last,
writes the sweep summary onto it and ends it.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from filelock import FileLock
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from loralab.fs import atomic_write_json
from loralab.reporting import compare
from loralab.tracking.mlflow import MLflowTracker

log = logging.getLogger(__name__)

PARENT_FILE = "mlflow_parent.json"  # {"run_id", "uri", "experiment"} of the sweep's parent run
LOCK_FILE = ".mlflow_parent.lock"
ROLE_TAG = "loralab.role"  # "sweep" on parents, "sweep_job" on children
SWEEP_DIR_TAG = "loralab.sweep_dir"
LOCK_TIMEOUT_S = 120  # a job waiting longer than this for the parent's creation gives up loudly


def is_multirun() -> bool:
    """True inside a job of ``train.py -m`` (any sweeper, any launcher)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def read_parent(sweep_dir: str | Path) -> dict[str, str] | None:
    path = Path(sweep_dir) / PARENT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def get_or_create_parent(sweep_dir: str | Path, uri: str, experiment: str,
                         tags: dict[str, str] | None = None) -> str:
    """The sweep's parent run id; the first caller (of any process) creates the run, the rest read it."""
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(sweep_dir / LOCK_FILE, timeout=LOCK_TIMEOUT_S):
        found = read_parent(sweep_dir)
        if found:
            return found["run_id"]
        tracker = MLflowTracker(uri, experiment, run_name=f"sweep-{sweep_dir.parent.name}-{sweep_dir.name}")
        run_id = tracker.start({}, tags={ROLE_TAG: "sweep", SWEEP_DIR_TAG: str(sweep_dir.resolve()),
                                         **(tags or {})})
        atomic_write_json(sweep_dir / PARENT_FILE, {"run_id": run_id, "uri": uri, "experiment": experiment})
        log.info("sweep parent run %s for %s", run_id, sweep_dir)
        return run_id


def job_context(tracker: MLflowTracker) -> tuple[str | None, dict[str, str]]:
    """(parent run id, child tags) for the current job; (None, {}) outside a multirun or without tracking."""
    if not (tracker.enabled and is_multirun()):
        return None, {}
    hc = HydraConfig.get()
    parent = get_or_create_parent(hc.sweep.dir, tracker.uri, tracker.experiment)
    overrides = list(hc.overrides.task)
    num = hc.job.get("num", 0)
    return parent, {ROLE_TAG: "sweep_job", SWEEP_DIR_TAG: str(Path(hc.sweep.dir).resolve()),
                    compare.OVERRIDES_TAG: json.dumps(overrides),
                    "mlflow.runName": f"job{num} {' '.join(overrides)}"[:250]}


def close_orphans(client, parent_id: str) -> int:
    """Mark children still RUNNING after every job returned (a killed process never ends its run) as FAILED."""
    orphans = [r for r in compare.child_runs(client, parent_id) if r.info.status == "RUNNING"]
    for run in orphans:
        client.set_tag(run.info.run_id, "error", "job ended without closing its run (killed?)")
        client.set_terminated(run.info.run_id, status="FAILED")
    if orphans:
        log.warning("%d job run(s) of sweep %s were left RUNNING; marked FAILED", len(orphans), parent_id)
    return len(orphans)


class SweepTracking(Callback):
    """Hydra callback (``hydra.callbacks`` in conf/hydra/default.yaml): parent run before the sweep, summary after.

    ``on_multirun_end`` runs in the launching process once every job has returned, whatever the launcher.
    """

    def __init__(self, summary_name: str = "sweep_summary") -> None:
        self.summary_name = summary_name

    @staticmethod
    def _tracking(config: DictConfig) -> DictConfig | None:
        tracking = config.get("tracking")
        return tracking if tracking is not None and tracking.get("enabled", True) else None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        tracking = self._tracking(config)
        if tracking is None:
            return
        hydra = config.hydra
        params = hydra.sweeper.get("params")
        tags = {"hydra.sweeper": hydra.sweeper.get("_target_", "?"),
                "hydra.launcher": hydra.launcher.get("_target_", "?"),
                "hydra.overrides": " ".join(hydra.overrides.task) or "(none)",
                "sweep.params": json.dumps(OmegaConf.to_container(params) if params else {})}
        get_or_create_parent(hydra.sweep.dir, tracking.uri, tracking.experiment, tags)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        tracking = self._tracking(config)
        if tracking is None:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        parent_id = get_or_create_parent(sweep_dir, tracking.uri, tracking.experiment)
        parent = MLflowTracker(tracking.uri, tracking.experiment)
        parent.run_id = parent_id
        close_orphans(parent.client, parent_id)
        rows = compare.sweep_rows(parent.client, parent_id)
        paths = compare.write_summary(rows, sweep_dir, self.summary_name)
        for path in paths:
            parent.log_artifact(path, "summary")
        done = [r for r in rows if r["status"] == "FINISHED" and not math.isnan(r["objective"])]
        if done:
            best = done[0]  # rows come sorted best first
            parent.log_metrics({f"best.{best['objective_key']}": best["objective"]})
            parent.set_tags({"best_run_id": best["run_id"], "best_overrides": best["overrides"]})
        parent.log_metrics({"jobs": len(rows), "jobs_failed": sum(r["status"] != "FINISHED" for r in rows)})
        parent.end("FINISHED" if done else "FAILED")
        log.info("sweep summary: %s", ", ".join(str(p) for p in paths))
        compare.print_table(rows, title=f"sweep {sweep_dir}")
