"""Real ``python train.py`` runs on the tiny model: every artifact, the MLflow record, failures, determinism."""

from __future__ import annotations

import json
import subprocess
import zipfile
from collections import Counter
from importlib.metadata import version
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import BAD_TRAIN_LINES, LABELS, ROOT, new_store, run_trains
from mlflow.tracking import MlflowClient

from loralab.reporting.provenance import PACKAGES

pytestmark = pytest.mark.slow  # three train.py subprocesses side by side: ~30 s on two idle CPU cores

GAMMA = "2.0"  # set on the command line, so params and the overrides tag have something to show
WEIGHTS = "sqrt_inverse"  # not the default (none): set so the data report has weights computed from the counts


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data):
    """A normal run; the same run failed by the export size limit (after training, with MLflow started); and
    one stopped by a bad config value. Keyed by name: (exit code, console output, run dir)."""
    data = [
        "data=jsonl",
        f"data.train_file={tiny_data['train']}",
        f"data.val_file={tiny_data['val']}",
        f"loss.gamma={GAMMA}",
        f"loss.class_weights={WEIGHTS}",
    ]
    overrides = {
        "finished": [*data, "hardware=auto"],
        "failed": [*data, "export.max_size_mb=0.00001"],
        "bad_config": ["loss.gamma=-1"],
    }
    dirs = {name: tmp_path_factory.mktemp(name) for name in overrides}
    for name in ("finished", "failed"):  # the bad config must leave its run dir without a store
        new_store(dirs[name] / "mlflow.db")
    results = run_trains(*((dirs[name], overrides[name]) for name in overrides))
    return {name: (*result, dirs[name]) for name, result in zip(overrides, results)}


@pytest.fixture(scope="module")
def finished(runs) -> Path:
    returncode, output, run_dir = runs["finished"]
    assert returncode == 0, output[-5000:]
    return run_dir


def read_json(path: Path):
    return json.loads(path.read_text())


def mlflow_runs(run_dir: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(experiment_ids)


def macro_f1(matrix):
    """Per class F1 = 2 TP / (predicted + actual), averaged over the classes that occur."""
    f1s = []
    for i in range(len(matrix)):
        tp, predicted, actual = matrix[i][i], sum(row[i] for row in matrix), sum(matrix[i])
        if predicted or actual:
            f1s.append(2 * tp / (predicted + actual))
    return sum(f1s) / len(f1s)


def test_metrics_json(finished, tiny_data):
    m = read_json(finished / "metrics.json")
    cm = m["confusion_matrix"]
    assert cm["labels"] == LABELS
    val_counts = Counter(r["label"] for r in tiny_data["val_rows"])
    assert [sum(row) for row in cm["matrix"]] == [val_counts[label] for label in LABELS]
    assert m["val_accuracy"] == pytest.approx(sum(cm["matrix"][i][i] for i in range(3)) / len(tiny_data["val_rows"]))
    assert m["val_macro_f1"] == pytest.approx(macro_f1(cm["matrix"]))
    assert {label: c["support"] for label, c in m["per_class"].items()} == {lb: val_counts[lb] for lb in LABELS}
    assert set(m["per_class"]["long"]) == {"precision", "recall", "f1", "support"}

    history = read_json(finished / "training_summary.json")["history"]
    assert m["val_macro_f1"] == pytest.approx(history[m["best_epoch"] - 1]["val_macro_f1"])  # best weights reloaded
    for metric, gate in m["gates"].items():
        op, threshold = gate["rule"].split()
        expected = {">=": m[metric] >= float(threshold), ">": m[metric] > float(threshold)}[op]
        assert gate["passed"] is expected, metric


def test_data_report_json(finished, tiny_data):
    report = read_json(finished / "data_report.json")
    train_rows = tiny_data["train_rows"]
    bad = Counter(reason for reason, _ in BAD_TRAIN_LINES)
    assert report["train_file"]["rows_read"] == len(train_rows) + len(BAD_TRAIN_LINES)  # the blank line is not a row
    assert report["train_file"]["rows_kept"] == len(train_rows)
    assert report["train_file"]["rows_dropped"] == sum(bad.values())
    assert report["train_file"]["dropped_by_reason"] == dict(bad)
    assert report["val_file"]["rows_kept"] == len(tiny_data["val_rows"])
    assert report["leakage"] == {"ids_in_both": 1, "examples": [tiny_data["leaked_id"]], "policy": "warn"}

    before = dict(Counter(r["label"] for r in train_rows))
    counts = report["class_counts"]
    assert counts["train_before_oversampling"] == {label: before[label] for label in LABELS}
    # The default duplicates nothing (data.oversample_to=null); the weights asked for come from the same counts.
    assert counts["train_after_oversampling"] == counts["train_before_oversampling"]
    assert report["oversampled"] is False and report["oversampling"] == {"to": None, "duplication": 1.0}
    weights = report["class_weights"]
    assert weights["mode"] == WEIGHTS and weights["computed_from"] == "train_after_oversampling"
    n = [before[label] for label in LABELS]
    expected = [(1 / c) ** 0.5 for c in n]
    expected = [w * len(n) / sum(expected) for w in expected]  # mean 1
    assert [weights["values"][label] for label in LABELS] == pytest.approx(expected)
    rarest, commonest = LABELS[n.index(min(n))], LABELS[n.index(max(n))]
    assert weights["values"][rarest] > 1 > weights["values"][commonest]


def test_training_summary_json(finished):
    s = read_json(finished / "training_summary.json")
    assert [h["epoch"] for h in s["history"]] == [1, 2]
    f1s = [h["val_macro_f1"] for h in s["history"]]
    assert s["best_epoch"] == f1s.index(max(f1s)) + 1
    assert s["stop_reason"] == "max_epochs" and s["epochs_run"] == 2
    fit_time = sum(h["epoch_train_time_s"] for h in s["history"])
    assert s["wall_time_s"] > fit_time > 0 and s["train_samples_per_s"] > 0
    assert all({"train_loss", "val_loss", "val_accuracy", "epoch_train_time_s"} <= set(h) for h in s["history"])


def test_checkpoint_and_zip(finished):
    """The default run trains LoRA over the pretrained tiny base: the best checkpoint is its adapter (+ head), and
    the zip carries merged/, adapter/ and the base the adapter belongs to (it exists on no hub)."""
    ckpt = finished / "checkpoint_best"
    files = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()}
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "loralab_checkpoint.json",
    } <= files
    with zipfile.ZipFile(finished / "model_final.zip") as zf:  # the deployable export
        names = set(zf.namelist())
        assert {
            "loralab.json",
            "merged/model.safetensors",
            "merged/config.json",
            "merged/tokenizer.json",
            "adapter/adapter_model.safetensors",
            "base/model.safetensors",
        } <= names
        id2label = json.loads(zf.read("merged/config.json"))["id2label"]
        assert id2label == {str(i): label for i, label in enumerate(LABELS)}
        adapter = safetensors.torch.load(zf.read("adapter/adapter_model.safetensors"))
    best = safetensors.torch.load_file(ckpt / "adapter_model.safetensors")
    assert adapter.keys() == best.keys() and all(torch.equal(adapter[k], best[k]) for k in best)
    assert any("lora_A" in k for k in best) and any("score" in k for k in best)


def test_mlflow_run_record(finished):
    client, runs = mlflow_runs(finished)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["loss.gamma"] == GAMMA
    assert run.data.params["trainer.max_epochs"] == "2"
    assert f"loss.gamma={GAMMA}" in run.data.tags["hydra.overrides"].split()
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert run.data.tags["git_commit"] == head
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert run.data.tags["git_dirty"] == str(bool(dirty.stdout.strip()))
    assert {p: run.data.tags[f"version.{p}"] for p in PACKAGES} == {p: version(p) for p in PACKAGES}
    counts = read_json(finished / "data_report.json")["class_counts"]
    assert {k: v for k, v in run.data.metrics.items() if k.startswith("class_count.")} == {
        f"class_count.{split}.{label}": n for split, c in counts.items() for label, n in c.items()
    }

    history = read_json(finished / "training_summary.json")["history"]
    logged = client.get_metric_history(run.info.run_id, "val_macro_f1")
    assert sorted((m.step, m.value) for m in logged) == [
        (h["epoch"], pytest.approx(h["val_macro_f1"])) for h in history
    ]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {
        "metrics.json",
        "data_report.json",
        "training_summary.json",
        "model_final.zip",
        "checkpoint_best",
        "config.yaml",
    } <= artifacts


def test_the_logged_config_is_the_one_the_run_used(finished):
    """hardware=auto is resolved once, visibly: config.yaml in the run dir and the MLflow params hold the values
    the run used (not ``auto``), and they are the same values."""
    from omegaconf import OmegaConf

    from loralab.tracking.mlflow import flatten

    used = OmegaConf.to_container(OmegaConf.load(finished / "config.yaml"))
    assert used["hardware"]["device"] == "cpu" and used["hardware"]["precision"] == "fp32"
    assert "auto" not in {str(v) for k, v in used["hardware"].items() if k != "name"}  # name: the profile, auto
    _, (run,) = mlflow_runs(finished)
    assert run.data.params == {k: str(v) for k, v in flatten(used).items()}


def test_failure_after_run_start_marks_run_failed(runs):
    returncode, output, run_dir = runs["failed"]
    assert returncode != 0
    assert "ExportError" in output
    assert not (run_dir / "model_final.zip").exists()
    _, mlruns = mlflow_runs(run_dir)
    assert [r.info.status for r in mlruns] == ["FAILED"]
    tags = mlruns[0].data.tags
    assert (
        tags["error_type"] == "ExportError"
        and tags["error"].startswith("ExportError: ")
        and "max_size_mb" in tags["error"]
    )


def test_same_seed_same_losses(runs):
    """The failed run differs only in the export limit, which acts after training: its epochs must match exactly."""
    histories = [read_json(runs[name][2] / "training_summary.json")["history"] for name in ("finished", "failed")]
    for key in ("train_loss", "val_loss", "val_macro_f1"):
        assert [h[key] for h in histories[0]] == [h[key] for h in histories[1]], key


def test_bad_config_fails_fast_with_one_line(runs):
    returncode, output, run_dir = runs["bad_config"]
    assert returncode == 2
    lines = output.splitlines()
    errors = [line for line in lines if "ConfigError" in line]
    assert len(errors) == 1 and errors[0].endswith("ConfigError: loss.gamma=-1.0: must be >= 0")  # the typed value
    assert "Traceback" not in output
    assert not any("loralab.models" in line or "loralab.data" in line for line in lines)  # nothing loaded
    assert not (run_dir / "data_report.json").exists()
    assert not (run_dir / "mlflow.db").exists()  # no MLflow store, so no run
