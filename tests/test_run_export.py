"""A LoRA run end to end through ``run.train``: calibration and export land in the run dir and in MLflow, the
zip predicts, and an export that does not reproduce the model fails the run."""

import json
import math

import pytest
from conftest import compose_run
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file, save_file

import loralab.export
from loralab.config import ConfigError, check
from loralab.export import ExportError
from loralab.inference import predict_file
from loralab.lifecycle import run as train


def only_run(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("loralab").experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_calibration_and_export_config(tmp_path):
    cfg = compose_run(tmp_path, "run", "calibration=none")
    assert cfg.calibration.method == "none" and cfg.calibration.n_bins == 15
    check(cfg)
    for override, key in (
        ("export.zip_parts=[merged]", "export.zip_parts"),
        ("export.zip_parts=[merged,loralab.json,weights]", "export.zip_parts"),
        ("calibration.method=platt", "calibration.method"),
        ("calibration.t_bounds=[2,5]", "calibration.t_bounds"),
    ):
        with pytest.raises(ConfigError, match=key):
            check(compose_run(tmp_path, "run", override))


@pytest.mark.slow
def test_lora_run_calibrates_exports_and_tracks(tmp_path):
    cfg = compose_run(tmp_path, "run")
    train(cfg)
    run_dir = tmp_path / "run"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in (
        "temperature",
        "val_nll",
        "val_ece",
        "val_brier",
        "val_nll_calibrated",
        "val_ece_calibrated",
        "val_brier_calibrated",
    ):
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), key
    assert 0.05 <= metrics["temperature"] <= 20.0  # inside calibration.t_bounds
    for suffix in ("", "_calibrated"):
        assert metrics[f"val_nll{suffix}"] > 0 and 0 <= metrics[f"val_ece{suffix}"] <= 1
        assert 0 <= metrics[f"val_brier{suffix}"] <= 2
    assert metrics["val_nll_calibrated"] <= metrics["val_nll"]  # T=1 is inside the search range
    assert (run_dir / "plots/reliability_diagram.png").is_file()
    meta = json.loads((run_dir / "loralab.json").read_text())
    assert meta["parts"] == ["merged", "adapter", "base"] and meta["temperature"] == metrics["temperature"]
    assert meta["data"]["train_file"]["sha256"] == loralab.export.sha256_file(cfg.data.train_file)
    assert meta["serialization"]["template"] == cfg.data.template and meta["max_length"] == 48
    assert set(meta["packages"]) >= {"torch", "transformers", "peft"}
    client, run = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["calibrated.temperature"] == pytest.approx(metrics["temperature"])
    assert run.data.metrics["calibrated.val_ece"] == pytest.approx(metrics["val_ece_calibrated"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model_final.zip", "loralab.json", "plots"} <= artifacts
    assert "plots/reliability_diagram.png" in [a.path for a in client.list_artifacts(run.info.run_id, "plots")]
    stats = predict_file(run_dir / "model_final.zip", cfg.data.val_file, tmp_path / "pred.jsonl", device="cpu")
    assert stats["rows_kept"] == 16 and stats["model_part"] == "merged"


@pytest.mark.slow
def test_export_mismatch_fails_the_run(tmp_path, monkeypatch):
    save = loralab.export._save

    def corrupting_save(directory, model, tokenizer):  # an exporter bug: merged/ weights are off
        save(directory, model, tokenizer)
        if directory.name == "merged":
            weights = load_file(directory / "model.safetensors")
            weights["score.weight"] += 0.01
            save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})

    monkeypatch.setattr(loralab.export, "_save", corrupting_save)
    with pytest.raises(ExportError, match="merged/ logits differ"):
        train(compose_run(tmp_path, "run", "lora=none"))  # full fine-tuning: merged/ is the only form
    _, run = only_run(tmp_path)
    assert run.info.status == "FAILED" and run.data.tags["error_type"] == "ExportError"
    assert "merged/ logits differ" in run.data.tags["error"]
