"""Tracking trouble never costs training: a store that goes away mid-run (a real ``mlflow server``, stopped) turns
each write into a warning after a short retry, later writes are dropped at once, and the loop trains and
checkpoints every epoch as if nothing happened."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from conftest import optim_conf, trainer_conf
from test_trainer import Tiny, loader, rows
from torch import nn
from torch.utils.data import DataLoader

from loralab.core.checkpoint import Checkpoints, read_meta
from loralab.core.trainer import FitInputs, Trainer
from loralab.tracking import mlflow as tracking
from loralab.tracking.mlflow import MLflowTracker
from loralab.tracking.server import mlflow_server


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
