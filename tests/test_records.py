"""Record validation (every drop reason is counted, never raised) and split assembly."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from conftest import LABELS, row, write_jsonl

from loralab.data.records import DataError, load_records
from loralab.data.splits import build_splits

GOOD = row("ok", "long", x=1.5, name="a", flag=True)

BAD = [  # (reason, line) — each line is dropped for exactly that reason
    ("invalid_json", '{"id": "a", "features": {"x": 1}, "label": "long"'),
    ("not_object", "[1, 2, 3]"),
    ("not_object", '"just a string"'),
    ("missing_id", json.dumps({"features": {"x": 1}, "label": "long"})),
    ("missing_id", json.dumps(row(""))),
    ("missing_id", json.dumps(row(None))),
    ("missing_features", json.dumps({"id": "b", "label": "long"})),
    ("missing_features", json.dumps({"id": "b", "features": {}, "label": "long"})),
    ("features_not_object", json.dumps({"id": "c", "features": [1, 2], "label": "long"})),
    ("features_not_object", json.dumps({"id": "c", "features": "x=1", "label": "long"})),
    ("features_not_flat", json.dumps(row("d", x={"y": 1}))),
    ("features_not_flat", json.dumps(row("d", x=[1, 2]))),
    ("non_ascii_key", json.dumps(row("e", é=1))),
    ("non_finite_value", '{"id": "f", "features": {"x": NaN}, "label": "long"}'),
    ("non_finite_value", '{"id": "f", "features": {"x": Infinity}, "label": "long"}'),
    ("non_finite_value", '{"id": "f", "features": {"x": -Infinity}, "label": "long"}'),
    ("non_finite_value", '{"id": "f", "features": {"x": 1e999}, "label": "long"}'),
    ("null_feature_value", json.dumps(row("g", x=None))),
    ("missing_label", json.dumps(row("h", None))),
    ("missing_label", json.dumps(row("h", ""))),
    ("unknown_label", json.dumps(row("i", "maybe"))),
    ("duplicate_id", json.dumps(row("ok", "short"))),  # GOOD's id again
    ("invalid_utf8", b'{"id": "j", "features": {"x": "\xff"}, "label": "long"}'),
]
ALL_BAD = [line for reason, line in BAD if reason != "duplicate_id"]  # a file with no valid row


@pytest.mark.parametrize(("reason", "line"), BAD, ids=[f"{r}-{i}" for i, (r, _) in enumerate(BAD)])
def test_each_drop_reason(tmp_path, reason, line):
    records, report = load_records(write_jsonl(tmp_path / "d.jsonl", [GOOD, line]), LABELS)
    assert [(r.id, r.label, r.features) for r in records] == [("ok", "long", GOOD["features"])]
    assert (report.rows_read, report.rows_kept, dict(report.dropped)) == (2, 1, {reason: 1})
    assert report.examples == {reason: 2}


def test_report_counts_every_reason_bom_and_blank_lines(tmp_path):
    lines, first_line = [], {}
    for reason, line in BAD:
        lines += ["", line]  # blank lines between rows are formatting, not rows
        first_line.setdefault(reason, len(lines) + 1)  # + 1: GOOD comes first
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, *lines])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # a BOM on the first (valid) line

    records, report = load_records(path, LABELS)
    assert [r.id for r in records] == ["ok"]
    assert report.as_dict() == {
        "path": str(path),
        "rows_read": len(BAD) + 1,
        "rows_kept": 1,
        "rows_dropped": len(BAD),
        "dropped_by_reason": dict(sorted(Counter(r for r, _ in BAD).items())),
        "first_line_by_reason": dict(sorted(first_line.items())),
    }


def test_first_occurrence_of_an_id_wins(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [row(1, "short"), row("1", "long"), row(2, "skip")])
    records, report = load_records(path, LABELS)
    assert [(r.id, r.label) for r in records] == [(1, "short"), (2, "skip")]
    assert report.dropped == {"duplicate_id": 1}


def test_null_values_kept_when_allowed(tmp_path):
    records, report = load_records(write_jsonl(tmp_path / "d.jsonl", [row("g", x=None)]), LABELS, allow_null=True)
    assert [r.features for r in records] == [{"x": None}] and not report.dropped


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_records(tmp_path / "absent.jsonl", LABELS)


@pytest.mark.parametrize("bad_split", ["train", "val"])
def test_all_bad_file_is_a_clear_data_error(tmp_path, bad_split):
    good = write_jsonl(tmp_path / "good.jsonl", [row(i, LABELS[i % 3]) for i in range(6)])
    bad = write_jsonl(tmp_path / "bad.jsonl", ALL_BAD)
    files = {"train": good, "val": good, bad_split: bad}
    with pytest.raises(DataError) as err:
        build_splits(str(files["train"]), str(files["val"]), LABELS)
    assert f"{bad_split} split from {bad}: no valid rows" in str(err.value)


def test_all_bad_file_without_val_file(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", ALL_BAD)
    with pytest.raises(DataError, match="0 valid rows"):
        build_splits(str(bad), None, LABELS)


@pytest.fixture
def leaky_files(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [row(f"t{i}", LABELS[i % 3]) for i in range(9)])
    val = write_jsonl(tmp_path / "val.jsonl", [row("t4", "short"), row("t7", "short"), row("v1", "skip")])
    return str(train), str(val)


@pytest.mark.parametrize("policy", ["warn", "drop"])
def test_leaked_ids_are_reported(leaky_files, policy):
    splits = build_splits(*leaky_files, LABELS, leakage=policy)
    assert splits.report["leakage"] == {"ids_in_both": 2, "examples": ["t4", "t7"], "policy": policy}
    train_ids = {r.id for r in splits.train}
    assert ({"t4", "t7"} <= train_ids) == (policy == "warn")
    assert len(train_ids) == (9 if policy == "warn" else 7)


def test_leakage_error_policy(leaky_files):
    with pytest.raises(DataError, match="2 ids appear in both"):
        build_splits(*leaky_files, LABELS, leakage="error")


def test_carved_val_split_is_disjoint_stratified_and_seeded(tmp_path):
    n_by_label = {"long": 12, "short": 18, "skip": 30}
    rows = [row(f"{label}-{i}", label) for label, n in n_by_label.items() for i in range(n)]
    path = str(write_jsonl(tmp_path / "d.jsonl", rows))

    def carve(seed):
        return build_splits(path, None, LABELS, val_split=0.25, seed=seed)

    splits = carve(seed=3)
    train_ids, val_ids = [r.id for r in splits.train], [r.id for r in splits.val]
    assert not set(train_ids) & set(val_ids)
    assert sorted(train_ids + val_ids) == sorted(r["id"] for r in rows)
    val_counts = splits.report["class_counts"]["val"]
    assert all(abs(val_counts[label] - 0.25 * n) < 1 for label, n in n_by_label.items())
    assert splits.report["val_from_train"]["val_ids"] == val_ids
    assert [r.id for r in carve(seed=3).val] == val_ids
    assert {r.id for r in carve(seed=4).val} != set(val_ids)


def test_tiny_file_carves_val_without_stratification(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [row(i, LABELS[i % 3]) for i in range(10)])
    splits = build_splits(str(path), None, LABELS, val_split=0.2)  # 2 val rows, 3 classes
    assert len(splits.val) == 2 and len(splits.train) == 8
    assert not {r.id for r in splits.train} & {r.id for r in splits.val}


def test_val_split_leaving_train_empty_is_a_data_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [row(1, "long"), row(2, "short")])
    with pytest.raises(DataError, match="data.val_split=0.9 of 2 valid rows leaves a split empty"):
        build_splits(str(path), None, LABELS, val_split=0.9)


def test_leakage_drop_that_empties_train_is_a_clear_error(tmp_path):
    rows = [{"id": i, "features": {"x": i}, "label": "long"} for i in range(3)]
    for name in ("train", "val"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="leakage=drop removed every training row"):
        build_splits(
            str(tmp_path / "train.jsonl"), str(tmp_path / "val.jsonl"), ["long", "short", "skip"], leakage="drop"
        )


def test_a_split_with_no_valid_rows_says_why_in_its_own_message(tmp_path):
    """The run stops before any report is written, so the message itself carries the drop counts."""
    bad = write_jsonl(tmp_path / "train.jsonl", ["{oops", json.dumps(row(1, "maybe")), json.dumps(row(2, "maybe"))])
    with pytest.raises(DataError) as err:
        build_splits(str(bad), None, LABELS)
    message = str(err.value)
    assert "too few to carve" in message  # no valid row at all: said before any split
    val = write_jsonl(tmp_path / "val.jsonl", [json.dumps(row(3, "maybe")), "{oops"])
    good = write_jsonl(tmp_path / "good.jsonl", [row(i, "long") for i in range(4)])
    with pytest.raises(DataError) as err:
        build_splits(str(good), str(val), LABELS)
    message = str(err.value)
    assert message.startswith(f"val split from {val}: no valid rows left after validation (2 read, ")
    assert "'invalid_json': 1" in message and "'unknown_label': 1" in message and "data_report.json" not in message
