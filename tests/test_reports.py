"""Plots, report.md, the scikit-learn baseline and the terminal output of a run."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import new_store, run_result
from matplotlib.image import imread
from mlflow.tracking import MlflowClient
from rich.console import Console
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.feature_extraction import DictVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from loralab.baseline import build_estimator, feature_dicts, fit_baseline
from loralab.data.demo import write_demo
from loralab.data.splits import build_splits
from loralab.metrics import classification_metrics, evaluate_gates
from loralab.reporting import console, plots
from loralab.reporting.report import render_report, write_reports
from loralab.tracking.mlflow import MLflowTracker

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["long", "short", "skip"]
GATES = {
    "val_macro_f1": ">= 0.60",
    "val_f1_long": "> 0.99",
    "val_recall_short": ">= 0.0",
    "val_f1_absent": "> 0.5",
}  # pass, FAIL, pass, skipped


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    train, val = write_demo(out, n_train=240, n_val=80)
    return build_splits(str(train), str(val), LABELS, seed=3, oversample_to="balanced")


@pytest.fixture(scope="module")
def run_data(demo):
    """A synthetic 3-epoch history and best-epoch metrics built with the real metric functions."""
    rng = np.random.default_rng(0)
    y = np.array([LABELS.index(r.label) for r in demo.val])
    history = []
    for epoch in (1, 2, 3):
        pred = np.where(rng.random(len(y)) < 0.3 * epoch, y, rng.integers(0, 3, len(y)))
        history.append(
            {
                "epoch": epoch,
                "train_loss": 1.0 / epoch,
                "val_loss": 1.1 / epoch + 0.05,
                **classification_metrics(y, pred, LABELS)["scalars"],
            }
        )
    report = classification_metrics(y, pred, LABELS)
    baseline = fit_baseline("logreg", demo.train_original, demo.val, LABELS, seed=0, threads=1)
    metrics = {
        "best_epoch": 3,
        **report["scalars"],
        "val_loss": history[-1]["val_loss"],
        "per_class": report["per_class"],
        "confusion_matrix": report["confusion_matrix"],
        "gates": evaluate_gates(report["scalars"], GATES),
        "baseline": baseline,
    }
    summary = run_result(
        objective=history[-1]["val_macro_f1"],
        best_epoch=3,
        epochs_run=3,
        history=history,
        wall_time_s=12.0,
        train_samples_per_s=100.0,
    )
    return history, metrics, summary


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 5000, path  # a blank figure is ~2 kB
    height, width, _ = imread(path).shape
    assert height > 300 and width > 500


def test_each_plot_is_written_and_readable(tmp_path, run_data, demo):
    history, metrics, _ = run_data
    paths = plots.make_plots(tmp_path / "plots", history, metrics, demo.report["class_counts"], LABELS)
    assert set(paths) == {
        "loss_curves",
        "f1_curves",
        "confusion_matrix",
        "class_distribution",
        "baseline_confusion_matrix",
    }
    for path in paths.values():
        assert path.parent == tmp_path / "plots"
        assert_png(path)


def test_plots_without_classification_data_are_left_out(tmp_path):
    history = [{"epoch": 1, "train_loss": 0.5, "val_loss": 0.6}]  # e.g. a regression run
    paths = plots.make_plots(tmp_path, history, {"best_epoch": 1}, None, LABELS)
    assert list(paths) == ["loss_curves"]
    assert_png(paths["loss_curves"])


def test_baseline_equals_sklearn_fit_directly(demo):
    y_train = [LABELS.index(r.label) for r in demo.train_original]
    y_val = [LABELS.index(r.label) for r in demo.val]
    direct = {
        "hgb": make_pipeline(
            DictVectorizer(sparse=False), HistGradientBoostingClassifier(class_weight="balanced", random_state=5)
        ),
        "logreg": make_pipeline(
            DictVectorizer(),
            StandardScaler(with_mean=False),
            LogisticRegression(class_weight="balanced", random_state=5),
        ),
    }
    for name, model in direct.items():
        with threadpool_limits(1):  # OpenMP spin-waiting on a busy host turns a 0.5 s fit into 15 s
            pred = model.fit([r.features for r in demo.train_original], y_train).predict([r.features for r in demo.val])
        result = fit_baseline(
            name, demo.train_original, demo.val, LABELS, seed=5, params={"class_weight": "balanced"}, threads=1
        )
        assert result["scalars"]["val_macro_f1"] == pytest.approx(f1_score(y_val, pred, average="macro"))
        assert [result["per_class"][lb]["f1"] for lb in LABELS] == pytest.approx(
            f1_score(y_val, pred, average=None, labels=[0, 1, 2]).tolist()
        )
        assert result["train_rows"] == len(demo.train_original)


def test_baseline_trains_on_rows_before_oversampling(demo):
    before = demo.report["class_counts"]["train_before_oversampling"]
    assert demo.report["oversampled"] and len(demo.train) > len(demo.train_original)
    assert len(demo.train_original) == sum(before.values())
    assert {lb: sum(r.label == lb for r in demo.train_original) for lb in LABELS} == before


def test_vectorizer_one_hots_strings_and_keeps_bools_numeric(demo):
    vec = build_estimator("logreg", 0)[0].fit(feature_dicts(demo.train_original))
    names = set(vec.feature_names_)
    assert {"fvg_bull", "wave_strength"} <= names and "fvg_bull=True" not in names
    assert any(n.startswith("session=") for n in names) and "session" not in names


def test_baseline_that_cannot_fit_returns_none(demo):
    one_class = [r for r in demo.train_original if r.label == "skip"]
    assert fit_baseline("logreg", one_class, demo.val, LABELS, seed=0) is None


def test_report_has_metrics_table_gates_and_plot_links(tmp_path, run_data, demo):
    history, metrics, summary = run_data
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- trainer.max_epochs=3\n- baseline=logreg\n")
    plots.loss_curves(history, tmp_path / "plots" / "reliability_diagram.png")  # stands in for calibration's
    tracker = MLflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "reports-test")
    tracker.start({"seed": 0})
    written = write_reports(tmp_path, LABELS, summary, metrics, demo.report, tracker)
    tracker.end()

    text = (tmp_path / "report.md").read_text()
    assert "| metric | model | baseline (logreg) | gate | status |" in text
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| val_")}
    assert rows["val_macro_f1"].endswith("| pass |") == (metrics["val_macro_f1"] >= 0.60)
    assert rows["val_f1_long"].endswith("| **FAIL** |")
    assert rows["val_f1_absent"].endswith("| skipped |")
    assert f"{metrics['baseline']['scalars']['val_macro_f1']:.4f}" in rows["val_macro_f1"]
    assert "trainer.max_epochs=3" in text and tracker.run_id in text
    for name in ("loss_curves", "f1_curves", "confusion_matrix", "class_distribution", "reliability_diagram"):
        assert f"](plots/{name}.png)" in text
    for path in written:
        assert path.is_file()
    client = MlflowClient(tracker.uri)
    logged = {a.path for a in client.list_artifacts(tracker.run_id)}
    logged |= {a.path for a in client.list_artifacts(tracker.run_id, "plots")}
    assert {"report.md", "plots/loss_curves.png", "plots/confusion_matrix.png"} <= logged


def test_report_data_section_counts_dropped_rows(tmp_path, run_data):
    _, metrics, summary = run_data
    bad = tmp_path / "train.jsonl"
    rows = [json.dumps({"id": i, "features": {"x": i}, "label": "long" if i % 2 else "skip"}) for i in range(8)]
    bad.write_text("\n".join(rows + ["{not json", json.dumps({"id": 99, "features": {"x": 1}, "label": "up"})]))
    splits = build_splits(str(bad), None, LABELS, val_split=0.25, seed=0)
    text = render_report(
        metrics=metrics,
        data_report=splits.report,
        result=summary,
        plots={},
        overrides=[],
        run_id=None,
        tracking_uri=None,
        run_dir=str(tmp_path),
    )
    assert f"| train_file | `{bad}` | 10 | 8 | 2 |" in text
    assert "| train_file | invalid_json | 1 | 9 |" in text and "| train_file | unknown_label | 1 | 10 |" in text
    assert "(none: defaults only)" in text


def test_summary_table_shows_baseline_gates_and_mlflow(run_data):
    _, metrics, summary = run_data
    full = dataclasses.replace(
        summary,
        metrics=metrics,
        run_dir="/runs/x",
        run_id="abc123",
        tracking_uri="sqlite:///m.db",
        artifacts=["/runs/x/report.md"],
    )
    out = Console(record=True, width=200)
    console.print_summary(full, out)
    text = out.export_text()
    assert "baseline (logreg)" in text and "FAIL" in text
    table_rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") > 3}
    assert "skipped" in table_rows["val_f1_absent"] and "FAIL" in table_rows["val_f1_long"]
    base = f"{metrics['baseline']['scalars']['val_macro_f1']:.4f}"
    assert base in table_rows["val_macro_f1"]
    assert "/runs/x/report.md" in text and "mlflow ui --backend-store-uri sqlite:///m.db" in text
    line = console.run_line(full, job=4)
    assert "\n" not in line and line.startswith("run 4 |") and "mlflow abc123" in line


def test_quiet_setting():
    assert console.is_quiet("auto", multirun=True) and not console.is_quiet("auto", multirun=False)
    assert console.is_quiet(True, multirun=False) and not console.is_quiet(False, multirun=True)


def test_config_tree_marks_overrides():
    tree = console.config_tree({"data": {"val_split": 0.2}, "trainer": {"max_epochs": 2}}, ["trainer.max_epochs=2"])
    segments = {seg.text: seg.style for seg in Console(width=120).render(tree) if ":" in seg.text}
    assert segments["max_epochs: 2"].color.name == "yellow"
    assert segments["val_split: 0.2"] is None or segments["val_split: 0.2"].color is None


@pytest.mark.slow
def test_tiny_run_writes_plots_report_and_one_quiet_line(tmp_path):
    train, val = write_demo(tmp_path / "data", n_train=60, n_val=30)
    run_dir, db = tmp_path / "run", tmp_path / "mlflow.db"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "data=jsonl",
        f"data.train_file={train}",
        f"data.val_file={val}",
        "trainer.max_epochs=1",
        "model.tokenizer_vocab_size=300",
        f"hydra.run.dir={run_dir}",
        f"tracking.uri={new_store(db)}",
        "quiet=true",
        "baseline.threads=1",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("loss_curves", "f1_curves", "confusion_matrix", "class_distribution"):
        assert_png(run_dir / "plots" / f"{name}.png")
    assert "](plots/confusion_matrix.png)" in (run_dir / "report.md").read_text()

    metrics = json.loads((run_dir / "metrics.json").read_text())
    run = MlflowClient(f"sqlite:///{db}").search_runs(
        [MlflowClient(f"sqlite:///{db}").get_experiment_by_name("loralab").experiment_id]
    )[0]
    assert run.data.metrics["baseline.val_macro_f1"] == pytest.approx(metrics["baseline"]["scalars"]["val_macro_f1"])
    # Quiet: no config tree, no INFO logs; warnings may appear, the run itself is one line.
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip() and "[WARNING]" not in ln]
    assert len(lines) == 1 and run.info.run_id in lines[0] and "├──" not in proc.stdout, proc.stdout
    assert "[INFO]" not in proc.stdout


def test_plots_of_200_classes_take_seconds_and_stay_readable(tmp_path):
    """Past MANY_CLASSES the plots turn compact (no per-cell numbers, the lowest-F1 classes only), so a 200-class
    run's plots cost seconds, not minutes."""
    import time

    labels = [f"c{i:03d}" for i in range(200)]
    rng = np.random.default_rng(0)
    y = rng.integers(0, 200, 2000)
    pred = np.where(rng.random(2000) < 0.7, y, rng.integers(0, 200, 2000))
    report = classification_metrics(y, pred, labels)
    history = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e, **report["scalars"]} for e in (1, 2)]
    metrics = {"best_epoch": 2, "confusion_matrix": report["confusion_matrix"], "baseline": {}}
    counts = {"train": dict.fromkeys(labels, 10), "val": dict.fromkeys(labels, 3)}
    t0 = time.perf_counter()
    paths = plots.make_plots(tmp_path, history, metrics, counts, labels)
    assert time.perf_counter() - t0 < 30  # the full layout took ~150 s on 2 cores
    assert set(paths) == {"loss_curves", "f1_curves", "confusion_matrix", "class_distribution"}
    for path in paths.values():
        assert_png(path)
