"""A tiny run on tables end to end: CSV train (custom id/label columns, custom label names, string features, empty
cells, malformed rows) + Parquet val, then predict and evaluate on CSV and Parquet with the exported model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import CONF_DIR, new_store, write_table
from hydra import compose, initialize_config_dir

from loralab.cli.evaluate import main as evaluate_main
from loralab.cli.predict import main as predict_main
from loralab.data.demo import make_rows
from loralab.inference import evaluate_file, predict_file
from loralab.lifecycle import run as train

pytestmark = pytest.mark.slow  # one tiny training run in-process (~20 s on two cores)

NAMES = {"long": "up", "short": "down", "skip": "flat"}  # custom label names


def flat_rows(n: int, seed: int, start: int) -> list[dict]:
    """Demo records as table rows: ``row_id``, ``target``, the features; every 7th row has an empty ``atr``."""
    rows = []
    for i, r in enumerate(make_rows(n, seed, start_id=start)):
        features = {**r["features"], "atr": None if i % 7 == 3 else r["features"]["atr"]}
        rows.append({"row_id": r["id"], "target": NAMES[r["label"]], **features})
    return rows


@pytest.fixture(scope="module")
def table_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("table_run")
    train_rows, val_rows, test_rows = flat_rows(48, 0, 0), flat_rows(24, 1, 1000), flat_rows(20, 2, 2000)
    train_file = write_table(tmp / "train.csv", train_rows, "row_id", "target")
    with train_file.open("a", newline="") as fh:  # malformed rows, counted by the reasons JSONL uses
        writer = csv.writer(fh)
        writer.writerow(["bad-1", "up"])  # wrong_column_count
        writer.writerow(["bad-2", "sideways", *list(train_rows[0].values())[2:]])  # unknown_label
        writer.writerow(["", "up", *list(train_rows[0].values())[2:]])  # missing_id
        writer.writerow(["bad-4", "up", *["inf"] * (len(train_rows[0]) - 2)])  # non_finite_value
    write_table(tmp / "val.parquet", val_rows)
    write_table(tmp / "test.csv", test_rows, "row_id", "target")
    write_table(tmp / "test.parquet", [{k: v for k, v in r.items() if k != "target"} for r in test_rows])
    overrides = [
        "data=jsonl",
        f"data.train_file={train_file}",
        f"data.val_file={tmp / 'val.parquet'}",
        "data.id_column=row_id",
        "data.label_column=target",
        "data.labels=[up,down,flat]",
        "data.allow_null=true",
        "trainer.max_epochs=1",
        "model.tokenizer_vocab_size=300",
        "model.max_length=128",
        "optim.batch_size=8",
        f"paths.output_dir={tmp / 'run'}",
        f"tracking.uri={new_store(tmp / 'mlflow.db')}",
        "export.zip=false",
        "hardware=cpu",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    train(cfg)
    return tmp, test_rows


def test_training_reads_both_formats_and_counts_bad_rows(table_run):
    tmp, _ = table_run
    report = json.loads((tmp / "run" / "data_report.json").read_text())
    assert report["train_file"]["dropped_by_reason"] == {
        "missing_id": 1,
        "non_finite_value": 1,
        "unknown_label": 1,
        "wrong_column_count": 1,
    }
    assert report["train_file"]["rows_kept"] == 48 and report["val_file"]["rows_kept"] == 24
    assert report["labels"] == ["up", "down", "flat"]
    meta = json.loads((tmp / "run" / "loralab.json").read_text())
    assert meta["columns"] == {"id": "row_id", "label": "target"}


def test_predict_on_parquet_and_evaluate_on_csv(table_run, capsys):
    tmp, test_rows = table_run
    stats = predict_file(tmp / "run", tmp / "test.parquet", tmp / "pred.jsonl", device="cpu")
    scored = [json.loads(line) for line in (tmp / "pred.jsonl").read_text().splitlines()]
    assert [s["id"] for s in scored] == [r["row_id"] for r in test_rows] and stats["rows_dropped"] == 0
    assert all(set(s["probs"]) == {"up", "down", "flat"} for s in scored)
    metrics = evaluate_file(tmp / "run", tmp / "test.csv", device="cpu")
    assert metrics["input"]["rows_kept"] == 20 and Path(metrics["output"]) == tmp / "test.metrics.json"
    # the same file as CSV scores the same: one reader, one serialization
    predict_file(tmp / "run", tmp / "test.csv", tmp / "pred_csv.jsonl", device="cpu")
    assert [json.loads(line)["probs"] for line in (tmp / "pred_csv.jsonl").read_text().splitlines()] == [
        s["probs"] for s in scored
    ]
    # the command lines: columns named explicitly, and a format that is not the extension's
    (tmp / "test_csv.txt").write_bytes((tmp / "test.csv").read_bytes())
    assert (
        predict_main(
            [
                f"model={tmp / 'run'}",
                f"input={tmp / 'test_csv.txt'}",
                f"output={tmp / 'p.jsonl'}",
                "format=csv",
                "id_column=row_id",
                "label_column=target",
                "device=cpu",
            ]
        )
        == 0
    )
    assert "scored 20 of 20 rows" in capsys.readouterr().out
    assert evaluate_main([f"model={tmp / 'run'}", f"input={tmp / 'test.csv'}", "id_column=nope", "device=cpu"]) == 2
    assert "no id column 'nope'" in capsys.readouterr().err
