"""A new task needs one module and one YAML, nothing under ``src/``: the toy task (``tests/toy/``) runs through the
real lifecycle from ``train.py``, resumes exactly after SIGKILL, sweeps into MLflow child runs and logs a model
that ``mlflow.pyfunc`` loads and that predicts as the run scored."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from conftest import ROOT, compose_train, new_store, typed_conf
from mlflow.tracking import MlflowClient
from test_resume import assert_same_run, history, start_and_signal

from loralab.config import ConfigError, check
from loralab.data.demo import write_demo
from loralab.metrics import classification_metrics
from loralab.tracking.mlflow import using_store

TOY = ROOT / "tests" / "toy"
TOY_CONF = [f"hydra.searchpath=[file://{TOY / 'conf'}]", "experiment=toy"]


@pytest.fixture(autouse=True)
def toy_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(TOY))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy_data")
    write_demo(out, n_train=3000, n_val=300)
    return out


def toy_cmd(data: Path, run_dir: Path, *extra: str, multirun: bool = False) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "train.py"),
        *(["-m"] if multirun else []),
        *TOY_CONF,
        f"data.train_file={data / 'train.jsonl'}",
        f"data.val_file={data / 'val.jsonl'}",
        "optim.batch_size=8",
        "trainer.max_epochs=6",
        "trainer.early_stopping.patience=20",
        f"hydra.run.dir={run_dir}",
        f"hydra.sweep.dir={run_dir.parent / 'multirun'}",
        f"tracking.uri={new_store(run_dir.parent / 'mlflow.db')}",
        *extra,
    ]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(TOY)]), "OMP_NUM_THREADS": "1"}


def test_the_task_class_brings_its_schema_and_rules(tmp_path):
    train, _ = write_demo(tmp_path, n_train=10, n_val=5)
    files = (*TOY_CONF, f"data.train_file={train}")
    conf = typed_conf(*files)
    assert type(conf).__name__ == "ToyConf" and conf.task.name == "toy" and conf.model.hidden_dim == 16
    with pytest.raises(ConfigError, match=r"^data.template='\{features\} x': the toy model reads numbers$"):
        check(compose_train(*files, "data.template='{features} x'"))
    with pytest.raises(ConfigError, match=r"^trainer.monitor='val_f1_up': must be val_macro_f1"):
        check(compose_train(*files, "trainer.monitor=val_f1_up"))
    with pytest.raises(ConfigError, match=r"^ensemble='blend': blends a classifier's probabilities; .* task is toy"):
        check(compose_train(*files, "ensemble=blend", "baseline=hgb"))


@pytest.mark.slow
def test_a_task_outside_the_package_trains_resumes_sweeps_and_logs_its_model(data, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", env()["PYTHONPATH"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    reference, killed = tmp_path / "ref" / "run", tmp_path / "killed" / "run"
    subprocess.run(toy_cmd(data, reference), check=True, capture_output=True)
    rc, out = start_and_signal(toy_cmd(data, killed), killed, signal.SIGKILL)
    assert rc == -signal.SIGKILL, out[-2000:]
    proc = subprocess.run([*toy_cmd(data, killed), "resume=auto"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(reference, killed)
    assert len(history(reference)) == 6

    # The logged model scores the val file as the run's best epoch did.
    client = MlflowClient(f"sqlite:///{reference.parent}/mlflow.db")
    (run,) = client.search_runs(client.search_experiments()[0].experiment_id)
    assert run.info.status == "FINISHED" and run.data.tags["task"] == "toy"
    with using_store(client.tracking_uri):
        model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    rows = pd.read_json(data / "val.jsonl", lines=True)
    features = pd.DataFrame(list(rows["features"]))
    labels = ["long", "short", "skip"]
    predicted = model.predict(features)["label"].map(labels.index).to_numpy()
    expected = classification_metrics(rows["label"].map(labels.index).to_numpy(), predicted, labels)["scalars"]
    assert expected["val_macro_f1"] == pytest.approx(run.data.metrics["best.objective"], abs=1e-9)

    # A sweep: one FINISHED child run per job under one parent, each with its model.
    sweep = tmp_path / "sweep" / "run"
    proc = subprocess.run(
        toy_cmd(data, sweep, "optim.lr=0.01,0.03", "trainer.max_epochs=2", multirun=True),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{sweep.parent}/mlflow.db")
    runs = client.search_runs(client.search_experiments()[0].experiment_id)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2 and len(runs) == 3
    assert {r.data.params["optim.lr"] for r in children} == {"0.01", "0.03"}
    assert all(r.info.status == "FINISHED" and r.data.tags["loralab.model_uri"] for r in children)
