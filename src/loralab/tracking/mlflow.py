"""MLflow: the one place that knows about runs. Everything goes through ``MlflowClient`` with an explicit run
id, so no global "active run" leaks between jobs of a sweep."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from filelock import FileLock, Timeout
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.time import get_current_time_millis

from loralab.config.changes import flatten
from loralab.errors import ConfigError
from loralab.fs import writable_file
from loralab.reporting.runs import using_store

log = logging.getLogger(__name__)

STORE_LOCK_TIMEOUT_S = 300  # creating a store's tables takes seconds; a lock held longer is a stuck process
SERVER_PROBE_TIMEOUT_S = 5.0  # a tracking server that does not answer /health within this is down
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
ERROR_TAGS = ("error", "error_type")  # set on a FAILED run; cleared when a resume reopens it
MAX_DIGEST_CHARS = 36  # MLflow's limit on a dataset digest: the sha256's prefix (the input tag keeps it whole)
# The UI reads this experiment tag to open an experiment on its runs table (not the GenAI traces overview).
EXPERIMENT_KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
NOTE_TAG = "mlflow.note.content"  # markdown the UI shows as the run's description
ARTIFACTS_DIR = "mlartifacts"  # beside a SQLite database: where its experiments keep their artifacts by default
MODEL_NAME = "model"  # the logged model's name: runs:/<run id>/model
MODEL_CODE = Path(__file__).with_name("model_code.py")
SERVED_BY = "served_by.txt"  # the logged model's artifact naming its PythonModel class (tracking/pyfunc.TaskModel)
# A write to the store that fails (SQLite locked by another process: each try waits up to its 20 s busy timeout; a
# server gone) is tried again after these pauses, then dropped with a warning; for PAUSE_AFTER_DROP seconds after a
# drop further writes are dropped at once, so a dead store costs seconds, not minutes an epoch. Training never waits
# longer than that and never fails for it.
RETRY_PAUSES_S = (1.0, 2.0)
PAUSE_AFTER_DROP_S = 60.0  # builds any logged model from its python_model class


def open_store(uri: str) -> MlflowClient:
    """A client whose store exists. MLflow creates a new SQLite store's tables on first use, and two processes
    doing that at once break each other's migrations (parallel sweep jobs on a fresh store): the first one to
    take the lock beside the database file creates the tables, the others find them."""
    if uri.startswith(("http://", "https://")):
        answers(uri)
    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    db = Path(uri[len("sqlite:///") :])
    writable_file(db, "tracking.uri")  # a directory or an unwritable dir: one line now, not MLflow's minute of retries
    try:
        with FileLock(f"{db}.lock", timeout=STORE_LOCK_TIMEOUT_S):
            return MlflowClient(tracking_uri=uri)  # the client's store creates (or finds) the tables here
    except Timeout:
        raise ConfigError(
            f"tracking.uri={uri}: {db}.lock held by another process for {STORE_LOCK_TIMEOUT_S} s (a stuck job?)"
        ) from None
    except Exception as err:  # OSError, SQLAlchemy's: a directory, a file or a database that cannot be used
        raise ConfigError(f"tracking.uri={uri}: cannot open the store {db} ({first_line(err)})") from None


def answers(uri: str, timeout_s: float = SERVER_PROBE_TIMEOUT_S) -> None:
    """A tracking server must answer before a run starts: MLflow's own client would retry for minutes and then
    fail with a traceback. Any HTTP answer counts (a proxy may refuse ``/health``); no answer is one line."""
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"tracking.uri={uri}: no MLflow server answers there within {timeout_s:g} s ({err})"
        ) from None


def error_tags(err: BaseException) -> dict[str, str]:
    """What a FAILED run carries: ``error`` (``Type: message``), ``error_type``, and the note the UI shows."""
    error = f"{type(err).__name__}: {err}"[:5000]
    return {"error": error, "error_type": type(err).__name__, NOTE_TAG: f"**FAILED**: {error}"}


def first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def artifact_root(uri: str, artifact_location: str | None = None) -> str | None:
    """Where a new experiment keeps its artifacts: ``artifact_location`` when given, else ``mlartifacts/`` beside a
    SQLite database (MLflow's own default, ``./mlruns`` of whatever directory the process runs in, would mix the
    artifacts of every store used from there); None for other stores (a tracking server decides itself)."""
    if artifact_location:
        return str(Path(artifact_location).resolve()) if "://" not in artifact_location else artifact_location
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///") :]).resolve().parent / ARTIFACTS_DIR)
    return None


def experiment_id(client: MlflowClient, name: str, artifact_location: str | None = None) -> str:
    """The experiment's id, created if missing (its artifacts at ``artifact_location``, fixed for good when MLflow
    creates it) and marked as model training unless it already has a kind."""
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(name, artifact_location=artifact_location)
    if not (exp and EXPERIMENT_KIND_TAG in exp.tags):
        client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return exp_id


def source_tags(git_commit: str, entry_point: str | None = None) -> dict[str, str]:
    """MLflow's standard source tags, which fill the UI's Source and Version columns."""
    tags = {"mlflow.source.name": entry_point or Path(sys.argv[0]).name or "loralab", "mlflow.source.type": "LOCAL"}
    if git_commit and git_commit != "unknown":
        tags["mlflow.source.git.commit"] = git_commit
    return tags


class MLflowTracker:
    """One MLflow run. Built by Hydra from ``conf/tracking``; ``run.py`` starts it and always ends it."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str | None = None,
        enabled: bool = True,
        system_metrics: bool = False,
        artifact_location: str | None = None,
        register_as: str | None = None,
        alias: str | None = None,
    ):
        self.uri, self.experiment, self.run_name, self.enabled = uri, experiment, run_name, enabled
        self.system_metrics = system_metrics
        self.artifact_location = artifact_root(uri, artifact_location)
        self.register_as, self.alias = register_as, alias
        self.client = open_store(uri) if enabled else None
        self.run_id: str | None = None
        self._monitor = None
        self._queued: list = []  # background log_batch operations, waited for in ``end``
        self.dropped = 0  # writes given up on (``_write``); said at ``end``
        self._down_until = 0.0

    def _write(self, what: str, write: Callable[[], Any]) -> Any:
        """``write()`` to the store, where tracking trouble must not cost training: retried after
        ``RETRY_PAUSES_S``, then dropped with a warning (None). Run creation and ending do not come through here."""
        if time.monotonic() < self._down_until:
            self.dropped += 1
            return None
        for pause in (*RETRY_PAUSES_S, None):
            try:
                return write()
            except Exception as err:  # MLflow, SQLAlchemy, HTTP: whatever the store raised
                if pause is None:
                    self.dropped += 1
                    self._down_until = time.monotonic() + PAUSE_AFTER_DROP_S
                    log.warning("MLflow: %s not recorded (%s); training goes on", what, first_line(err))
                    return None
                time.sleep(pause)
        return None

    def start(
        self,
        params: Mapping[str, Any],
        tags: Mapping[str, str] | None = None,
        parent_run_id: str | None = None,
        resume_run_id: str | None = None,
    ) -> str | None:
        """Create the run (params = flattened config), or reopen ``resume_run_id`` so a resumed training
        continues the same run instead of duplicating it."""
        if not self.enabled:
            return None
        if resume_run_id and not self._exists(resume_run_id):
            log.warning("MLflow run %s (from the checkpoint) is not in %s; starting a new run", resume_run_id, self.uri)
            resume_run_id = None
        if resume_run_id:
            self.run_id = resume_run_id
            self.client.update_run(resume_run_id, status="RUNNING")
            for key in set(ERROR_TAGS) & self.client.get_run(resume_run_id).data.tags.keys():
                self.client.delete_tag(resume_run_id, key)  # an earlier attempt's error is not this attempt's
            self.set_tags({k: v for k, v in (tags or {}).items() if not k.startswith("version.")})
            log.info("MLflow run %s reopened (resumed training)", resume_run_id)
            self._monitor_system(resumed=True)
            return self.run_id
        tags = dict(tags or {})
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        try:  # a store that cannot be written (read-only, locked past its busy timeout) fails here, in one line
            exp_id = experiment_id(self.client, self.experiment, self.artifact_location)
            # A tagged run name (sweep jobs name theirs after their overrides) wins over the configured one.
            run = self.client.create_run(exp_id, run_name=tags.pop("mlflow.runName", self.run_name), tags=tags)
        except Exception as err:
            raise ConfigError(f"tracking.uri={self.uri}: cannot start a run there ({first_line(err)})") from None
        self.run_id = run.info.run_id
        self.log_params(params)
        log.info("MLflow run %s in experiment %r at %s", self.run_id, self.experiment, self.uri)
        self._monitor_system(resumed=False)
        return self.run_id

    def fail_unfinished(self, run_id: str | None, err: BaseException) -> None:
        """The run a resume could not continue (its checkpoint is corrupt) ends FAILED with the error, so the UI
        says why; a run that had FINISHED stays FINISHED (its results stand)."""
        if not (self.enabled and run_id):
            return
        try:
            if self.client.get_run(run_id).info.status == "FINISHED":
                return
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in error_tags(err).items()])
            self.client.set_terminated(run_id, "FAILED")
        except Exception as store_err:  # not in this store, or the store is busy: the error line still reaches the user
            log.warning("MLflow run %s not marked FAILED (%s)", run_id, first_line(store_err))

    def close_if_running(self, run_id: str, why: str) -> None:
        """Mark ``run_id`` KILLED, with ``why`` as its error, if it is still RUNNING: a process that died without
        closing its run (SIGKILL, the OOM killer) leaves it so."""
        if not self.enabled:
            return
        try:
            if self.client.get_run(run_id).info.status != "RUNNING":
                return
            self.client.log_batch(run_id, tags=[RunTag("error", why), RunTag(NOTE_TAG, f"**KILLED**: {why}")])
            self.client.set_terminated(run_id, "KILLED")
        except Exception as err:  # not in this store (tracking.uri changed), or the store is busy: leave it
            log.warning("MLflow run %s of an earlier attempt not checked (%s)", run_id, first_line(err))
            return
        log.warning("MLflow run %s was left RUNNING by an attempt that died; marked KILLED", run_id)

    def _monitor_system(self, resumed: bool) -> None:
        """``tracking.system_metrics``: MLflow's own sampler (CPU, memory, disk, network, GPU) logs ``system/*``
        into this run from a thread; a resumed run continues its steps. Interval: MLFLOW_SYSTEM_METRICS_* env."""
        if not self.system_metrics:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=resumed, tracking_uri=self.uri)
        self._monitor.start()

    def log_params(self, params: Mapping[str, Any]) -> None:
        """The flattened config as params (write-once in MLflow: log them once per run)."""
        if self.run_id and params:
            flat = flatten(params)
            batch = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in flat.items()]
            self._write("params", lambda: self.client.log_batch(self.run_id, params=batch))

    def _exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
            return True
        except MlflowException:
            return False

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, background: bool = False) -> None:
        """Numeric values as metrics at ``step``. ``background``: queued on MLflow's async logger, so a training
        loop logging every few steps never waits on the store (~45 ms a write to SQLite on a busy CPU); ``end``
        waits for the queue. Metrics that must be stored before a checkpoint is written are logged in the
        foreground."""
        if not self.run_id:
            return
        now = get_current_time_millis()
        batch = [
            Metric(k, float(v), now, step or 0)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        if background:
            queued = self._write(
                "metrics", lambda: self.client.log_batch(self.run_id, metrics=batch, synchronous=False)
            )
            self._queued += [queued] if queued is not None else []
        else:
            self._write(f"metrics at step {step or 0}", lambda: self.client.log_batch(self.run_id, metrics=batch))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.run_id:
            batch = [RunTag(k, str(v)) for k, v in tags.items()]
            self._write("tags", lambda: self.client.log_batch(self.run_id, tags=batch))

    def set_provenance(self, prov: Mapping[str, str], resumed: bool = False) -> None:
        """Provenance tags plus MLflow's source tags; a resumed run keeps the versions it started with."""
        tags = {**prov, **source_tags(prov.get("git_commit", "unknown"))}
        self.set_tags(tags if not resumed else {k: v for k, v in tags.items() if not k.startswith("version.")})

    def log_datasets(self, files: Mapping[str, tuple[str | Path, str]]) -> None:
        """Data files as MLflow dataset inputs (the UI's Dataset column): ``{context: (path, sha256)}``, e.g.
        train/val. MLflow skips an input the run already has, so a reopened (resumed) run may log them again."""
        from mlflow.data.meta_dataset import MetaDataset  # mlflow.data is heavy; only runs with data files pay
        from mlflow.data.sources import LocalArtifactDatasetSource

        inputs = []
        for context, (path, sha256) in files.items():
            dataset = MetaDataset(
                LocalArtifactDatasetSource(str(path)), name=Path(path).name, digest=sha256[:MAX_DIGEST_CHARS]
            )
            inputs.append(
                DatasetInput(
                    dataset._to_mlflow_entity(),
                    tags=[InputTag("mlflow.data.context", context), InputTag("loralab.sha256", sha256)],
                )
            )
        # Parallel jobs race to create the same dataset row (check, then insert): the loser's next try finds it.
        if self.run_id and inputs:
            self._write("dataset inputs", lambda: self.client.log_inputs(self.run_id, datasets=inputs))

    def log_model(
        self,
        python_model: type,
        artifacts: Mapping[str, str | Path],
        signature,
        input_example,
        pip_requirements: list[str],
    ) -> str | None:
        """Log an MLflow model named ``model`` on this run (pyfunc, models-from-code: ``tracking/model_code.py``
        builds an instance of the ``python_model`` class when it is loaded, so loading unpickles nothing) and
        register it as a new version of ``register_as`` when set. ``artifacts`` reach the class as
        ``context.artifacts``. Returns its URI (``models:/<name>/<version>`` when registered, else
        ``runs:/<run id>/model``)."""
        if not self.run_id:
            return None
        import mlflow
        from mlflow.models import Model

        run = self.client.get_run(self.run_id)
        # Created here, in the run's experiment: Model.log would put it in the fluent API's current experiment.
        logged = self.client.create_logged_model(
            run.info.experiment_id, name=MODEL_NAME, source_run_id=self.run_id, params=run.data.params
        )
        with tempfile.TemporaryDirectory(prefix="loralab-model-") as tmp:  # MLflow copies the artifacts
            served_by = Path(tmp) / SERVED_BY
            served_by.write_text(f"{python_model.__module__}.{python_model.__qualname__}\n", encoding="utf-8")
            # MLflow loads the model back to check it serves the example: a progress bar for each copy of local files
            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
            with using_store(self.uri):  # MLflow logs and registers models through its fluent API only
                info = Model.log(
                    artifact_path=None,
                    name=MODEL_NAME,
                    flavor=mlflow.pyfunc,
                    run_id=self.run_id,
                    model_id=logged.model_id,
                    python_model=str(MODEL_CODE),
                    artifacts={**{k: str(v) for k, v in artifacts.items()}, SERVED_BY: str(served_by)},
                    signature=signature,
                    input_example=input_example,
                    pip_requirements=pip_requirements,
                    registered_model_name=self.register_as,
                )  # MLflow checks it serves the example
        version = info.registered_model_version
        uri = f"models:/{self.register_as}/{version}" if version else f"runs:/{self.run_id}/{MODEL_NAME}"
        if version and self.alias:  # the alias now names this version: models:/<name>@<alias>
            self._write(
                f"alias {self.alias}",
                lambda: self.client.set_registered_model_alias(self.register_as, self.alias, version),
            )
            self.set_tags({"loralab.model_alias": f"models:/{self.register_as}@{self.alias}"})
        self.set_tags({"loralab.model_uri": uri, "loralab.model_id": info.model_id})
        log.info("MLflow model logged: %s", uri)
        return uri

    def set_note(self, text: str) -> None:
        """The run's description in the UI (markdown)."""
        self.set_tags({NOTE_TAG: text})

    def log_dict(self, data: Any, artifact_file: str) -> None:
        if self.run_id:
            self._write(artifact_file, lambda: self.client.log_dict(self.run_id, data, artifact_file))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.run_id:
            return
        path, run_id = Path(path), self.run_id
        if path.is_dir():
            self._write(str(path), lambda: self.client.log_artifacts(run_id, str(path), artifact_path or path.name))
        elif path.exists():
            self._write(str(path), lambda: self.client.log_artifact(run_id, str(path), artifact_path=artifact_path))

    @contextlib.contextmanager
    def closing(self, killed: tuple[type[BaseException], ...] = (KeyboardInterrupt,)) -> Iterator[None]:
        """End the run however the block ends: FINISHED, KILLED (``killed`` exceptions) or FAILED with the error
        as tags. Every entry point uses this, so no run is ever left RUNNING by an exception."""
        status = "FAILED"
        try:
            yield
            status = "FINISHED"
        except killed:
            status = "KILLED"
            raise
        except Exception as err:
            self.set_tags(error_tags(err))
            raise
        finally:
            self.end(status)

    def end(self, status: str = "FINISHED") -> None:
        """Close the run as FINISHED, FAILED or KILLED. Safe to call when it never started."""
        for operation in self._queued:  # background metrics land before the run closes
            self._write("background metrics", operation.wait)
        self._queued = []
        if self._monitor is not None:  # its last samples land while the run is still open
            self._monitor.finish()
            self._monitor = None
        if self.run_id:
            self._down_until = 0.0  # the status is worth one more try, whatever failed before
            ended = self._write(
                f"the run's end ({status})", lambda: self.client.set_terminated(self.run_id, status) or 1
            )
            if ended:
                log.info("MLflow run %s ended %s", self.run_id, status)
        if self.dropped:
            log.warning("MLflow: %d write(s) to %s were dropped (see the warnings above)", self.dropped, self.uri)
