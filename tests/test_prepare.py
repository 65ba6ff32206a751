"""loralab-prepare (loralab.data.prepare): stratified, seed-deterministic train/val/test splits with disjoint ids."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from loralab.cli.prepare import main
from loralab.data.prepare import PrepareConfig, prepare
from loralab.data.regression_demo import make_articles

ROOT = Path(__file__).resolve().parents[1]
RATIOS = {"train": 0.8, "val": 0.1, "test": 0.1}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def classification_rows(n: int) -> list[dict]:
    labels = ["skip"] * 6 + ["long"] * 3 + ["short"]  # 60/30/10
    return [{"id": f"r{i}", "features": {"x": i}, "label": labels[i % len(labels)]} for i in range(n)]


def read_split(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]


def run_prepare(src: Path, out: Path, seed: int = 42, **kw) -> dict:
    return prepare(
        PrepareConfig(
            input=str(src), output_dir=str(out), seed=seed, **{f"{k}_ratio": v for k, v in RATIOS.items()}, **kw
        )
    )


def test_classification_split_keeps_label_shares_and_ids_disjoint(tmp_path):
    rows = classification_rows(400)
    src = write_jsonl(tmp_path / "in.jsonl", [*rows, rows[5], "{broken", {"id": "x", "features": {}}])
    report = run_prepare(src, tmp_path / "out")
    assert report["kind"] == "classification"
    assert report["input"]["dropped_by_reason"] == {"duplicate_id": 1, "invalid_json": 1, "missing_label": 1}
    splits = {name: read_split(tmp_path / "out", name) for name in RATIOS}
    ids = [r["id"] for rows_ in splits.values() for r in rows_]
    assert len(ids) == len(set(ids)) and set(ids) == {r["id"] for r in rows}
    overall = Counter(r["label"] for r in rows)
    for name, part in splits.items():
        assert len(part) == pytest.approx(RATIOS[name] * len(rows), abs=1)
        counts = Counter(r["label"] for r in part)
        for label, n in overall.items():  # stratified: each class within one row per split stage of its share
            assert abs(counts[label] - n * len(part) / len(rows)) <= 2
        assert report["splits"][name]["rows"] == len(part)
        order = [int(r["id"][1:]) for r in part]
        assert order == sorted(order)  # file order kept inside a split


def test_same_seed_same_files_other_seed_other_split(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", classification_rows(200))
    run_prepare(src, tmp_path / "a", seed=1)
    run_prepare(src, tmp_path / "b", seed=1)
    run_prepare(src, tmp_path / "c", seed=2)
    files = {d: [(tmp_path / d / f"{n}.jsonl").read_bytes() for n in RATIOS] for d in "abc"}
    assert files["a"] == files["b"] and files["a"] != files["c"]


def test_regression_records_are_stratified_by_score_tier(tmp_path):
    rows = make_articles(300, seed=9)
    report = run_prepare(write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out", score_tiers=3)
    assert report["kind"] == "regression" and report["stratified"] is True
    edges = report["tier_edges"]
    assert len(edges) == 4 and edges == sorted(edges)
    for name in RATIOS:
        part = report["splits"][name]
        assert all(part["strata_counts"][t] > 0 for t in report["overall"])  # every tier in every split
    # Drift is bounded by the rounding of a stratified split: about two rows of the smallest split.
    smallest = min(report["splits"][n]["rows"] for n in RATIOS)
    assert report["max_stratum_share_drift"] <= 2 / smallest


def test_cli_reports_proportions_and_rejects_bad_ratios(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", classification_rows(100))
    assert (
        main([f"input={src}", f"output_dir={tmp_path / 'out'}", "train_ratio=0.7", "val_ratio=0.2", "test_ratio=0.1"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "100 of 100 rows kept" in printed and "train" in printed and "test" in printed
    assert len(read_split(tmp_path / "out", "val")) == 20
    assert (
        main([f"input={src}", f"output_dir={tmp_path / 'bad'}", "train_ratio=0.7", "val_ratio=0.2", "test_ratio=0.2"])
        == 2
    )
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_python_m_entry_point(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", classification_rows(60))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "loralab.cli.prepare",
            f"input={src}",
            f"output_dir={tmp_path / 'o'}",
            "train_ratio=0.8",
            "val_ratio=0.1",
            "test_ratio=0.1",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert sum(len(read_split(tmp_path / "o", n)) for n in RATIOS) == 60


def test_time_split_cuts_train_val_test_in_time_and_purges_at_each_boundary(tmp_path, capsys):
    days = [f"2025-03-{1 + i // 2:02d}" for i in range(40)]  # two rows a day, the file shuffled
    rows = [
        {"id": f"r{i}", "features": {"x": i, "day": d}, "label": ["long", "skip"][i % 2]} for i, d in enumerate(days)
    ]
    rows = rows[1::2] + rows[::2] + [{"id": "bad", "features": {"x": 0, "day": "someday"}, "label": "long"}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    assert main([f"input={src}", f"output_dir={out}", "split=time", "time_key=day", "label_horizon=1"]) == 0
    report = json.loads((out / "split_report.json").read_text())
    assert report["input"]["dropped_by_reason"] == {"invalid_time": 1}
    t = report["time_split"]
    # 32/4/4 rows: train to 16 March, val 17-18, test 19-20; a one-day horizon purges 16 March (2 rows) from train
    # and 18 March (2 rows) from val; the ranges are those of the rows written.
    assert t["purged"] == {"train": 2, "val": 2}
    assert t["ranges"]["val"] == {"first": "2025-03-17T00:00:00Z", "last": "2025-03-17T00:00:00Z"}
    split_ids = {name: [r["id"] for r in read_split(out, name)] for name in RATIOS}
    assert [len(v) for v in split_ids.values()] == [30, 2, 4]
    assert max(int(i[1:]) for i in split_ids["train"]) == 29 and sorted(split_ids["val"]) == ["r32", "r33"]
    assert "2025-03-19T00:00:00Z .. 2025-03-20T00:00:00Z" in capsys.readouterr().out
    assert main([f"input={src}", f"output_dir={out}", "split=time", "time_format=%Y"]) == 2
    assert "time_pattern/time_format read time_key" in capsys.readouterr().err
