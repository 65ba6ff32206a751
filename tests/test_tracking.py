"""The MLflow store under concurrency, and one run per run dir: faults users hit with parallel sweeps."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT, compose_train
from filelock import FileLock
from mlflow.tracking import MlflowClient
from omegaconf import open_dict

from loralab.errors import ConfigError
from loralab.lifecycle import RUN_LOCK, run

START_A_RUN = """
import sys
from loralab.tracking.mlflow import MLflowTracker
tracker = MLflowTracker(sys.argv[1], "concurrent")
tracker.start({"job": sys.argv[2]})
tracker.end()
"""


@pytest.mark.slow
def test_processes_starting_runs_on_a_new_store_at_once_all_finish(tmp_path):
    """Without the lock beside the database, 2-3 of 3 processes died in MLflow's table migrations
    (``Online migration expected to match one row``, ``duplicate column name``)."""
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", START_A_RUN, uri, str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(4)
    ]
    results = [(p.wait(timeout=300), p.stdout.read()) for p in procs]
    assert all(rc == 0 for rc, _ in results), [out[-800:] for rc, out in results if rc]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("concurrent").experiment_id])
    assert sorted(r.data.params["job"] for r in runs) == ["0", "1", "2", "3"]
    assert {r.info.status for r in runs} == {"FINISHED"}


@pytest.mark.slow
def test_a_run_dir_in_use_is_refused_in_one_line(tmp_path):
    """Two runs in one run dir used to share (and break) each other's checkpoints and logs."""
    cfg = compose_train("trainer.max_epochs=1", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db")
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    (tmp_path / "run").mkdir()
    with FileLock(tmp_path / "run" / RUN_LOCK):  # another run holds it
        with pytest.raises(ConfigError) as err:
            run(cfg)
    assert str(err.value).startswith(f"hydra.run.dir={tmp_path / 'run'}: in use by another run")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "mlflow.db").exists()  # refused before any MLflow run
