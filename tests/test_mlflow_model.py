"""MLflow as its users know it: the model a run logs (pyfunc), loaded, registered and served; the settings MLflow users
set (``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME``) and where artifacts go; what a run holds.

One demo run for the module, launched as a user would (``python train.py`` in a fresh directory, default store,
demo data written on first use), so it also checks the first demo run's dataset digests and that no ``mlruns/``
appears in the current directory or the checkout.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, clean_env, compose_train, serve_predictions
from mlflow.tracking import MlflowClient

from loralab.inference import predict_file
from loralab.reporting.runs import using_store
from loralab.tracking.mlflow import ARTIFACTS_DIR, NOTE_TAG, artifact_root

MODEL_NAME = "demo-classifier"
ROWS = 24  # val rows scored by every path compared here


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    """``python train.py`` (1 epoch of LoRA on the tiny model, no pretrain stage: its cost is not what is tested here)
    in a fresh dir on the demo data, registering its model."""
    home = tmp_path_factory.mktemp("home")
    checkout_mlruns = (ROOT / "mlruns").exists()
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "trainer.max_epochs=1",
        "pretrain=none",
        "model.tokenizer_vocab_size=300",
        "model.max_length=64",
        f"tracking.register_as={MODEL_NAME}",
        f"hydra.run.dir={home / 'run'}",
        "quiet=true",
    ]
    proc = subprocess.run(
        cmd, cwd=home, env=clean_env(LORALAB_ROOT=str(home)), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("loralab").experiment_id])
    rows = [json.loads(line) for line in (home / "data" / "demo" / "val.jsonl").read_text().splitlines()[:ROWS]]
    (home / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    predict_file(home / "run" / "model_final.zip", home / "rows.jsonl", home / "predicted.jsonl", device="cpu")
    predicted = [json.loads(line) for line in (home / "predicted.jsonl").read_text().splitlines()]
    return {
        "home": home,
        "uri": uri,
        "client": client,
        "run": run,
        "rows": rows,
        "predicted": predicted,
        "checkout_mlruns": checkout_mlruns,
    }


def probs(rows, labels) -> np.ndarray:
    return np.array([[row[label] for label in labels] for row in rows])


@pytest.mark.slow
def test_pyfunc_model_gives_loralab_predict_probabilities(demo):
    labels = sorted(demo["predicted"][0]["probs"])
    expected = probs([p["probs"] for p in demo["predicted"]], labels)
    with using_store(demo["uri"]):
        model = mlflow.pyfunc.load_model(f"runs:/{demo['run'].info.run_id}/model")
    records = [{"id": r["id"], "features": r["features"]} for r in demo["rows"]]
    for model_input in (pd.DataFrame(records), records):  # a DataFrame or plain records
        out = model.predict(model_input)
        assert list(out["id"]) == [r["id"] for r in demo["rows"]]
        assert list(out["label"]) == [p["label"] for p in demo["predicted"]]
        assert np.abs(probs(out["probs"], labels) - expected).max() <= 1e-5
    assert model.metadata.signature.inputs.input_names() == ["id", "features"]
    assert model.metadata.get_input_schema() is not None
    with pytest.raises(Exception, match="features_not_flat"):  # a row loralab-predict would drop: named, not scored
        model.predict([{"id": "x", "features": {"a": {"nested": 1}}}])


@pytest.mark.slow
def test_model_is_registered_logged_and_loads_without_pickles(demo):
    client, run = demo["client"], demo["run"]
    version = client.get_model_version(MODEL_NAME, "1")
    assert version.run_id == run.info.run_id
    (logged,) = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert logged.source_run_id == run.info.run_id and logged.status.to_proto() == 2  # READY
    model_dir = Path(logged.artifact_location.removeprefix("file://"))
    files = {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()}
    assert "model_code.py" in files and not any(f.endswith((".pkl", ".pt", ".bin")) for f in files), files
    assert (model_dir / "artifacts" / "served_by.txt").read_text().strip() == "loralab.tracking.pyfunc.Classifier"
    assert {"artifacts/loralab.json", "input_example.json", "serving_input_example.json"} <= files
    assert any(f.startswith("artifacts/merged/") and f.endswith(".safetensors") for f in files)


@pytest.mark.slow
def test_run_holds_sources_description_and_demo_data_digests(demo):
    run, home = demo["run"], demo["home"]
    tags = run.data.tags
    assert tags["mlflow.source.name"] == "train.py" and tags["mlflow.source.type"] == "LOCAL"
    assert tags[NOTE_TAG].startswith("run | val_macro_f1 ") and f"models:/{MODEL_NAME}/1" in tags[NOTE_TAG]
    inputs = {
        {t.key: t.value for t in i.tags}["mlflow.data.context"]: i.dataset
        for i in demo["client"].get_run(run.info.run_id).inputs.dataset_inputs
    }
    for split in ("train", "val"):  # the demo files were written by this very run, then hashed
        sha = hashlib.sha256((home / "data" / "demo" / f"{split}.jsonl").read_bytes()).hexdigest()
        assert inputs[split].digest == sha[:36] and tags[f"data.{split}_file.sha256"] == sha
    metrics = run.data.metrics
    assert {
        "train_loss",
        "val_loss",
        "val_macro_f1",
        "best.val_macro_f1",
        "baseline.val_macro_f1",
        "calibrated.val_nll",
        "calibrated.temperature",
        "best.val_nll",
    } <= set(metrics)
    assert not any(k.startswith("baseline_") or k.endswith("_calibrated") for k in metrics)


@pytest.mark.slow
def test_artifacts_land_beside_the_database_never_in_mlruns(demo):
    home = demo["home"]
    assert demo["run"].info.artifact_uri.removeprefix("file://").startswith(str(home / ARTIFACTS_DIR))
    assert (home / ARTIFACTS_DIR / "models").is_dir()  # the logged model's files too
    assert not (home / "mlruns").exists()
    assert (ROOT / "mlruns").exists() == demo["checkout_mlruns"]


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_same_probabilities(demo):
    """``mlflow models serve -m models:/NAME/1 --env-manager local`` on 127.0.0.1, as the docs show."""
    rows = [{"id": r["id"], "features": r["features"]} for r in demo["rows"]]
    served = serve_predictions(f"models:/{MODEL_NAME}/1", demo["uri"], rows, demo["home"])
    labels = sorted(demo["predicted"][0]["probs"])
    assert [s["id"] for s in served] == [p["id"] for p in demo["predicted"]]
    assert (
        np.abs(
            probs([s["probs"] for s in served], labels) - probs([p["probs"] for p in demo["predicted"]], labels)
        ).max()
        <= 1e-5
    )


# --- a regression task logs its model the same way ------------------------------------------------------------------


@pytest.mark.slow
def test_tabular_regression_logs_a_model_that_predicts_like_its_checkpoint(tmp_path):
    import h5py
    import torch

    from loralab.data.regression_demo import write_tabular_demo
    from loralab.lifecycle import run as train
    from loralab.models.mlp import load_best
    from loralab.tasks.tabular_regression import CHECKPOINT

    train_h5, val_h5, schema = write_tabular_demo(
        tmp_path / "train.h5", tmp_path / "val.h5", tmp_path / "feature_schema.txt", n_train=64, n_val=16
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = compose_train(
        "experiment=marketsentinel",
        "data.demo=false",
        f"data.train_file={train_h5}",
        f"data.val_file={val_h5}",
        f"data.schema_file={schema}",
        f"paths.output_dir={tmp_path / 'run'}",
        f"tracking.uri={uri}",
        "trainer.max_epochs=2",
        "tracking.register_as=ms",
    )
    train(cfg)
    with h5py.File(val_h5) as fh:
        x = fh["X"][...]
    names = schema.read_text().split()
    with using_store(uri):
        model = mlflow.pyfunc.load_model("models:/ms/1")
        by_alias = mlflow.pyfunc.load_model("models:/ms@candidate")  # tracking.alias moved to the new version
    out = model.predict(pd.DataFrame(x.astype(np.float64), columns=names))
    assert by_alias.predict(pd.DataFrame(x.astype(np.float64), columns=names)).equals(out)
    assert str(MlflowClient(uri).get_model_version_by_alias("ms", "candidate").version) == "1"
    reference, _ = load_best(tmp_path / "run" / CHECKPOINT)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).logits.numpy()
    assert list(out.columns) == ["head_0", "head_1"]
    assert np.abs(out.to_numpy() - expected).max() <= 1e-6
    with pytest.raises(Exception, match=names[0]):
        model.predict(pd.DataFrame(x[:, 1:].astype(np.float64), columns=names[1:]))


# --- settings --------------------------------------------------------------------------------------------------------


def test_mlflow_environment_variables_are_used_and_explicit_overrides_win(tmp_path, monkeypatch):
    monkeypatch.setenv("LORALAB_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    cfg = compose_train()
    assert (cfg.tracking.uri, cfg.tracking.experiment) == (f"sqlite:///{tmp_path}/mlflow.db", "loralab")
    assert cfg.tracking.artifact_location is None and cfg.tracking.register_as is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    cfg = compose_train()
    assert (cfg.tracking.uri, cfg.tracking.experiment) == ("http://127.0.0.1:5000", "from-env")
    assert compose_train("experiment=marketsentinel").tracking.experiment == "from-env"
    cfg = compose_train("tracking.uri=sqlite:///x.db", "tracking.experiment=mine")
    assert (cfg.tracking.uri, cfg.tracking.experiment) == ("sqlite:///x.db", "mine")


def test_a_new_experiment_keeps_its_artifacts_beside_its_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's own default would be ./mlruns here
    from loralab.tracking.mlflow import MLflowTracker

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    tracker = MLflowTracker(uri, "beside")
    tracker.start({})
    tracker.log_dict({"a": 1}, "a.json")
    tracker.end()
    client = MlflowClient(uri)
    assert client.get_experiment_by_name("beside").artifact_location == str(tmp_path / "store" / ARTIFACTS_DIR)
    assert (tmp_path / "store" / ARTIFACTS_DIR / tracker.run_id / "artifacts" / "a.json").is_file()
    assert not (tmp_path / "mlruns").exists()
    elsewhere = MLflowTracker(uri, "elsewhere", artifact_location=str(tmp_path / "big-disk"))
    elsewhere.start({})
    assert client.get_experiment_by_name("elsewhere").artifact_location == str(tmp_path / "big-disk")
    assert artifact_root("http://127.0.0.1:5000") is None  # a server decides for its own store


def test_using_a_store_leaves_the_process_settings_as_they_were(tmp_path, monkeypatch):
    """``mlflow.set_tracking_uri`` exports ``$MLFLOW_TRACKING_URI``; left there, the next run's config would read it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = mlflow.get_tracking_uri()
    with using_store(uri):
        assert mlflow.get_tracking_uri() == uri
    assert "MLFLOW_TRACKING_URI" not in os.environ and mlflow.get_tracking_uri() == before
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///user.db")
    with using_store(uri):
        assert mlflow.get_tracking_uri() == uri
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///user.db" == mlflow.get_tracking_uri()
