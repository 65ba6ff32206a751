"""Tracking trouble never costs training: a store that goes away mid-run (a real ``mlflow server``, stopped) turns
each write into a warning after a short retry, later writes are dropped at once, and the loop trains and
checkpoints every epoch as if nothing happened. A store that cannot be used at the start is one line, at once."""

from __future__ import annotations

import logging
import sqlite3
import time

import pytest
import torch
from conftest import optim_conf, trainer_conf
from test_trainer import Tiny, loader, rows
from torch import nn
from torch.utils.data import DataLoader

from loralab.core.checkpoint import Checkpoints, read_meta
from loralab.core.trainer import FitInputs, Trainer
from loralab.errors import ConfigError
from loralab.tracking import mlflow as tracking
from loralab.tracking.mlflow import MLflowTracker
from loralab.tracking.server import free_port, mlflow_server


@pytest.mark.slow
def test_a_store_that_goes_away_mid_run_never_costs_training(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries: minutes against a dead port
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setattr(tracking, "RETRY_PAUSES_S", (0.2,))
    with mlflow_server(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "server") as url:
        tracker = MLflowTracker(url, "faults")
        tracker.start({"seed": 0})
        tracker.log_metrics({"before": 1.0}, step=0)
        run_id = tracker.run_id
    # The server is gone; training goes on.
    data = rows(40)
    trainer = Trainer(
        trainer_conf(3, monitor="val_loss", mode="min"), optim_conf(), precision="fp32", device=torch.device("cpu")
    )
    inputs = FitInputs(Tiny(), nn.CrossEntropyLoss(), loader(data, 4), DataLoader(data, batch_size=16), lambda y, p: {})
    trainer.setup(inputs, Checkpoints(tmp_path / "checkpoints", keep=1, mode="min", meta={}))
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING):
        state = trainer.fit(on_epoch_end=lambda st, metrics: tracker.log_metrics(metrics, step=st.epoch))
        tracker.set_tags({"stop_reason": state.stop_reason})
        tracker.end()
    assert len(state.history) == 3 and read_meta(tmp_path / "checkpoints" / "last")["loop"]["epoch"] == 3
    assert time.monotonic() - t0 < 30  # one failed write and its retry, not MLflow's minutes of backoff
    assert tracker.dropped == 5  # epochs 1-3 and the tags: the first after its retry, the rest at once; and the end
    warnings = [r.getMessage() for r in caplog.records if r.name == "loralab.tracking.mlflow"]
    assert warnings[0].startswith("MLflow: metrics at step 1 not recorded (") and "training goes on" in warnings[0]
    assert any("run's end (FINISHED) not recorded" in w for w in warnings)
    assert warnings[-1] == f"MLflow: 5 write(s) to {url} were dropped (see the warnings above)"
    assert run_id


def test_a_tracking_server_that_does_not_answer_fails_at_once_in_one_line():
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as err:
        MLflowTracker(f"http://127.0.0.1:{port}", "faults")
    assert time.monotonic() - t0 < 10  # MLflow's client alone retries for minutes
    message = str(err.value)
    assert (
        message.startswith(f"tracking.uri=http://127.0.0.1:{port}: no MLflow server answers there")
        and "\n" not in message
    )


def test_a_store_path_that_cannot_hold_a_database_is_one_line_naming_it(tmp_path):
    (tmp_path / "a_dir.db").mkdir()
    with pytest.raises(ConfigError, match=rf"^tracking.uri: {tmp_path}/a_dir.db is a directory; give a file path$"):
        MLflowTracker(f"sqlite:///{tmp_path}/a_dir.db", "faults")


@pytest.mark.slow
def test_a_store_locked_at_start_fails_the_start_in_one_line(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = MLflowTracker(uri, "faults")  # the store exists
    lock = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # another process writing for longer than SQLite's 20 s busy timeout
    try:
        with pytest.raises(ConfigError) as err:
            tracker.start({"seed": 0})
    finally:
        lock.execute("COMMIT")
    assert str(err.value).startswith(f"tracking.uri={uri}: cannot start a run there (") and "locked" in str(err.value)
