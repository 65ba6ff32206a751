"""A sweep is one MLflow parent run with one child run per Hydra job.

Jobs may run in this process, in joblib workers or on SLURM nodes, so none can rely on another's memory: they find
the parent through a small JSON file in the sweep dir, created once under a file lock (whoever comes first creates
the run, everyone else reads its id). The Hydra callback opens the parent before the first job and, after the last,
writes the sweep summary onto it and ends it (``sweep_callback.SweepTracking``).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from filelock import FileLock
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from loralab.fs import atomic_write_json
from loralab.reporting import compare, runs
from loralab.reporting.provenance import git_state
from loralab.tracking.mlflow import NOTE_TAG, MLflowTracker, source_tags

log = logging.getLogger(__name__)

PARENT_FILE = "mlflow_parent.json"  # {"run_id", "uri", "experiment", "swept"} of the sweep's parent run
LOCK_FILE = ".mlflow_parent.lock"
ROLE_TAG = "loralab.role"  # "sweep" on parents, "sweep_job" on children
SWEEP_DIR_TAG = "loralab.sweep_dir"
LOCK_TIMEOUT_S = 120  # a job waiting longer than this for the parent's creation gives up loudly
MAX_NAME = 250  # MLflow's limit on a run name


def is_multirun() -> bool:
    """True inside a job of ``train.py -m`` (any sweeper, any launcher)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def read_parent(sweep_dir: str | Path) -> dict[str, str] | None:
    path = Path(sweep_dir) / PARENT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def get_or_create_parent(
    sweep_dir: str | Path,
    uri: str,
    experiment: str,
    tags: dict[str, str] | None = None,
    swept: Sequence[str] | None = None,
    artifact_location: str | None = None,
) -> str:
    """The sweep's parent run id; the first caller (of any process) creates the run, the rest read it.
    ``swept``: the keys the sweep varies (None: unknown), recorded so every job can name its run after them;
    ``artifact_location``: of the experiment, should this create it (``tracking.artifact_location``)."""
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(sweep_dir / LOCK_FILE, timeout=LOCK_TIMEOUT_S):
        found = read_parent(sweep_dir)
        if found:
            return found["run_id"]
        name = sweep_name(swept) if swept else f"sweep-{sweep_dir.parent.name}-{sweep_dir.name}"
        run_id = MLflowTracker(uri, experiment, run_name=name, artifact_location=artifact_location).start(
            {}, tags={ROLE_TAG: "sweep", SWEEP_DIR_TAG: str(sweep_dir.resolve()), **(tags or {})}
        )
        atomic_write_json(
            sweep_dir / PARENT_FILE,
            {"run_id": run_id, "uri": uri, "experiment": experiment, "swept": None if swept is None else list(swept)},
        )
        log.info("sweep parent run %s for %s", run_id, sweep_dir)
        return run_id


def swept_keys(overrides: Iterable[str]) -> list[str] | None:
    """Keys given several values (``a=1,2``, ``choice(...)``, ``interval(...)``); None when Hydra cannot parse
    them (the jobs then name their runs after all their overrides)."""
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException:
        return None
    return list(dict.fromkeys(o.key_or_group for o in parsed if o.is_sweep_override()))  # once each, in order


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Each key's last segment (``loss.gamma`` → ``gamma``), the whole key where two would read the same."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: s if last.count(s) == 1 else k for k, s in zip(keys, last)}


def sweep_name(swept: Sequence[str], jobs: int | None = None) -> str:
    """``gamma×r sweep, 4 jobs``: what the sweep varies, readable in the UI's run list."""
    name = "×".join(short_keys(swept).values()) + " sweep" if swept else "sweep"
    return (name if jobs is None else f"{name}, {jobs} job{'s' * (jobs != 1)}")[:MAX_NAME]


def job_name(overrides: Sequence[str], swept: Sequence[str] | None, num: int) -> str:
    """``gamma=1.5 r=16``: the job's values of the swept keys (all its overrides when those are unknown)."""
    values = runs.override_values(overrides)
    keys = [k for k in (values if swept is None else swept) if k in values]
    labels = short_keys(keys)
    return " ".join(f"{labels[k]}={compare.short_value(values[k])}" for k in keys)[:MAX_NAME] or f"job{num}"


def job_context(tracker: MLflowTracker) -> tuple[str | None, dict[str, str]]:
    """(parent run id, child tags) for the current job; (None, {}) outside a multirun or without tracking."""
    if not (tracker.enabled and is_multirun()):
        return None, {}
    hc = HydraConfig.get()
    parent = get_or_create_parent(
        hc.sweep.dir, tracker.uri, tracker.experiment, artifact_location=tracker.artifact_location
    )
    overrides = list(hc.overrides.task)
    swept = (read_parent(hc.sweep.dir) or {}).get("swept")
    return parent, {
        ROLE_TAG: "sweep_job",
        SWEEP_DIR_TAG: str(Path(hc.sweep.dir).resolve()),
        runs.OVERRIDES_TAG: json.dumps(overrides),
        "mlflow.runName": job_name(overrides, swept, hc.job.get("num", 0)),
    }


def close_orphans(client, parent_id: str) -> int:
    """Mark children still RUNNING after every job returned (a killed process never ends its run) as FAILED."""
    orphans = [r for r in runs.child_runs(client, parent_id) if r.info.status == "RUNNING"]
    for run in orphans:
        client.set_tag(run.info.run_id, "error", "job ended without closing its run (killed?)")
        client.set_terminated(run.info.run_id, status="FAILED")
    if orphans:
        log.warning("%d job run(s) of sweep %s were left RUNNING; marked FAILED", len(orphans), parent_id)
    return len(orphans)


def name_uniquely(client, rows: list[dict[str, Any]]) -> None:
    """Jobs whose names collide (values shortened alike, an Optuna trial sampled twice) get their job number."""
    names = [row["run_name"] for row in rows]
    for row in rows:
        if names.count(row["run_name"]) > 1:
            row["run_name"] = f"{row['run_name']} (job {row['job']})"[-MAX_NAME:]
            client.update_run(row["run_id"], name=row["run_name"])


def sweep_note(rows: Sequence[dict[str, Any]], experiment_id: str, parent_id: str, files: Sequence[str]) -> str:
    """The parent's description in the UI: the best job (linked), its objective, a link to the summary artifacts
    (``files``, under ``summary/``), the heatmap and the table."""
    page = f"#/experiments/{experiment_id}/runs"
    table = next((f for f in files if f.endswith(".md")), "")
    heatmap = next((f for f in files if f.endswith(".png")), None)
    done = [r for r in rows if r["status"] == "FINISHED" and not math.isnan(r["objective"])]
    failed = sum(r["status"] != "FINISHED" for r in rows)
    lines = [
        f"**{len(rows)} jobs, {failed} failed.** Summary (table, CSV, heatmap): "
        f"[`summary/`]({page}/{parent_id}/artifacts/summary/{table}).",
        "",
    ]
    if done:
        best = done[0]
        lines.insert(
            0,
            f"**Best: [{best['run_name']}]({page}/{best['run_id']})**, "
            f"{best['objective_key']} = {best['objective']:.4f}\n",
        )
    if heatmap:  # the server's artifact endpoint, relative to the UI's address
        lines += [f"![heatmap](get-artifact?path=summary%2F{heatmap}&run_uuid={parent_id})", ""]
    return "\n".join(lines + [compare.to_markdown(rows)])


def tracking_of(config: DictConfig) -> DictConfig | None:
    """The sweep's ``tracking`` group, None when tracking is off."""
    tracking = config.get("tracking")
    return tracking if tracking is not None and tracking.get("enabled", True) else None


def open_sweep(config: DictConfig, tracking: DictConfig) -> None:
    """The parent run, before the first job: what was swept and how, and the source it ran."""
    hydra = config.hydra
    params = OmegaConf.to_container(hydra.sweeper.params) if hydra.sweeper.get("params") else {}
    commit = git_state(config.paths.root_dir)["git_commit"] if config.get("paths") else "unknown"
    tags = {
        "hydra.sweeper": hydra.sweeper.get("_target_", "?"),
        "hydra.launcher": hydra.launcher.get("_target_", "?"),
        "hydra.overrides": " ".join(hydra.overrides.task) or "(none)",
        "sweep.params": json.dumps(params),
        "git_commit": commit,
        **source_tags(commit),
    }
    swept = swept_keys([*hydra.overrides.task, *(f"{k}={v}" for k, v in params.items())])
    get_or_create_parent(
        hydra.sweep.dir, tracking.uri, tracking.experiment, tags, swept, tracking.get("artifact_location")
    )


def close_sweep(config: DictConfig, tracking: DictConfig, summary_name: str) -> None:
    """After the last job, in the launching process: the summary onto the parent, the best job, and the end."""
    sweep_dir = Path(config.hydra.sweep.dir)
    parent_id = get_or_create_parent(sweep_dir, tracking.uri, tracking.experiment)
    parent = MLflowTracker(tracking.uri, tracking.experiment)
    parent.run_id = parent_id
    close_orphans(parent.client, parent_id)
    rows = runs.sweep_rows(tracking.uri, parent_id)
    name_uniquely(parent.client, rows)
    paths = compare.write_summary(rows, sweep_dir, summary_name)
    for path in paths:
        parent.log_artifact(path, "summary")
    done = [r for r in rows if r["status"] == "FINISHED" and not math.isnan(r["objective"])]
    if done:
        best = done[0]  # rows come sorted best first
        parent.log_metrics({f"best.{best['objective_key']}": best["objective"], "best.objective": best["objective"]})
        parent.set_tags(
            {"best_run_id": best["run_id"], "best_run_name": best["run_name"], "best_overrides": best["overrides"]}
        )
    settings = compare.fold_settings(rows)
    if settings and not math.isnan(settings[0]["mean"]):
        top = settings[0]  # best mean over its folds
        parent.log_metrics({f"folds.{k}.{top['objective_key']}": top[k] for k in ("mean", "std", "worst")})
        parent.set_tags({"best_setting": json.dumps(top["setting"]), "best_setting_folds": " ".join(top["folds"])})
    parent.log_metrics({"jobs": len(rows), "jobs_failed": sum(r["status"] != "FINISHED" for r in rows)})
    experiment_id = parent.client.get_run(parent_id).info.experiment_id
    parent.set_tags(
        {
            NOTE_TAG: sweep_note(rows, experiment_id, parent_id, [p.name for p in paths]),
            "summary": f"runs:/{parent_id}/summary",
        }
    )
    swept = (read_parent(sweep_dir) or {}).get("swept")
    if swept:
        parent.client.update_run(parent_id, name=sweep_name(swept, len(rows)))
    parent.end("FINISHED" if done else "FAILED")
    log.info("sweep summary: %s", ", ".join(str(p) for p in paths))
    compare.print_table(rows, title=f"sweep {sweep_dir}")
    failed = sum(r["status"] != "FINISHED" for r in rows)
    if failed:  # the sweep went on past them; a script or CI running it must still see that it fell short
        log.error("%d of %d sweep jobs failed (each MLflow child run says why)", failed, len(rows))
        raise SystemExit(1)  # a BaseException: Hydra's callback runner lets it through, the process exits 1
