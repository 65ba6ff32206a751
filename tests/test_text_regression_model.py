"""The MLflow model a text regression run (``experiment=article_regression``) logs: loaded from the registry of a
temporary SQLite store (artifacts beside it), it scores articles as the run scored its val split."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import compose_train, write_jsonl
from mlflow.tracking import MlflowClient
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from loralab.core.loaders import eval_loader
from loralab.core.trainer import predict_logits
from loralab.data.articles import TokenizedArticles, load_articles
from loralab.data.regression_demo import DIMENSIONS, make_articles
from loralab.lifecycle import run as train
from loralab.reporting.runs import using_store
from loralab.tracking.mlflow import ARTIFACTS_DIR


def run_articles(tmp_path, *overrides: str):
    """A 2-epoch tiny article run registering its model as ``articles``; returns (cfg, loaded model, val rows)."""
    train_file = write_jsonl(tmp_path / "train.jsonl", make_articles(40, seed=1))
    val_rows = make_articles(16, seed=2, start_id=1000)
    val_file = write_jsonl(tmp_path / "val.jsonl", val_rows)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = compose_train(
        "experiment=article_regression",
        "data.demo=false",
        f"data.train_file={train_file}",
        f"data.val_file={val_file}",
        f"paths.output_dir={tmp_path / 'run'}",
        f"tracking.uri={uri}",
        "model.tokenizer_vocab_size=300",
        "hardware.torch_threads=1",
        "trainer.max_epochs=2",
        "optim.lr=1e-3",
        "tracking.register_as=articles",
        *overrides,
    )
    train(cfg)
    with using_store(uri):
        model = mlflow.pyfunc.load_model("models:/articles/1")
    return cfg, model, val_rows


def best_epoch_metrics(out_dir) -> dict[str, float]:
    history = json.loads((out_dir / "training_history.json").read_text())
    return min(history, key=lambda h: h["val_mae"])


@pytest.mark.slow
def test_article_model_predicts_the_runs_own_val_scores(tmp_path):
    cfg, model, val_rows = run_articles(tmp_path)
    out_dir = tmp_path / "run"
    frame = pd.DataFrame([{"id": r["id"], "title": r["title"], "content": r["content"]} for r in val_rows])
    pred = model.predict(frame)
    assert list(pred.columns) == DIMENSIONS and len(pred) == len(val_rows)

    # The run's own scoring of its val split: its loader (eval batches, longest first) on the best checkpoint.
    articles, _, _ = load_articles(cfg.data.val_file, DIMENSIONS)
    reference = AutoModelForSequenceClassification.from_pretrained(out_dir / "checkpoint_best").eval()
    tokenizer = AutoTokenizer.from_pretrained(out_dir / "checkpoint_best")
    ds = TokenizedArticles(articles, tokenizer, cfg.data.template, cfg.model.max_length)
    loader = eval_loader(
        ds,
        ds.lengths,
        DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8),
        batch_size=cfg.trainer.eval_batch_size,
        hardware=cfg.hardware,
    )
    expected, y = predict_logits(reference, loader, reference.device)
    order = list(loader.sampler)
    expected_in_order = np.empty_like(expected)
    expected_in_order[order] = expected
    diff = np.abs(pred.to_numpy() - expected_in_order).max()
    print(f"max abs diff vs the run's val scoring: {diff:.2e}")
    assert diff <= 1e-5
    # ... and the val MAE per dimension the run logged for its best epoch.
    best = best_epoch_metrics(out_dir)
    labels = np.array([r["labels"] for r in val_rows])
    for i, dim in enumerate(DIMENSIONS):
        assert np.abs(pred[dim].to_numpy() - labels[:, i]).mean() == pytest.approx(best[f"val_mae_{dim}"], abs=1e-5)

    # Logged from code, beside the database (never mlruns/), no pickles; a bad row is one error naming the rule.
    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(client.get_model_version("articles", "1").run_id)
    assert run.data.tags["loralab.model_uri"] == "models:/articles/1"
    assert (tmp_path / ARTIFACTS_DIR).is_dir() and not (tmp_path / "mlruns").exists()
    local = mlflow.artifacts.download_artifacts(
        artifact_uri="models:/articles/1", dst_path=str(tmp_path / "dl"), tracking_uri=cfg.tracking.uri
    )
    files = [p.name for p in Path(local).rglob("*") if p.is_file()]
    assert "model.safetensors" in files and not [f for f in files if f.endswith((".pkl", ".pt", ".bin"))]
    with pytest.raises(Exception, match="row 1 .*missing_text"):
        model.predict(pd.DataFrame([{"title": "a", "content": "b"}, {"title": " ", "content": ""}]))

    # Every file of the model dir is checked against the manifest saved with it before its weights load.
    mlflow.pyfunc.load_model(local)
    weights = next(Path(local).rglob("model.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(Exception, match="model.safetensors does not match its sha256"):
        mlflow.pyfunc.load_model(local)


@pytest.mark.slow
def test_lora_article_run_logs_the_merged_model(tmp_path):
    _, model, val_rows = run_articles(tmp_path, "lora=default", "trainer.max_epochs=1")
    pred = model.predict([{"title": r["title"], "content": r["content"]} for r in val_rows])
    best = best_epoch_metrics(tmp_path / "run")
    labels = np.array([r["labels"] for r in val_rows])
    assert (tmp_path / "run" / "merged" / "model.safetensors").is_file()
    assert np.abs(pred.to_numpy() - labels).mean() == pytest.approx(best["val_mae"], abs=1e-5)
