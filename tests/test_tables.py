"""CSV and Parquet records: the same validation, drop reasons, dedup, leakage check and splits as JSONL, and the
documented cell rules (ids keep their spelling, empty cells are null, labels match by text)."""

from __future__ import annotations

import json
import math
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import LABELS, write_table

from loralab.data.prepare import PrepareConfig, prepare
from loralab.data.records import DataError, RowFormat, load_records
from loralab.data.splits import build_splits
from loralab.data.tables import cell_value

FORMATS = ["jsonl", "csv", "parquet"]
GOOD = {"id": "ok", "label": "long", "x": 1.5, "name": "a"}
BAD = [  # (reason, flat row): each dropped for exactly that reason in every format
    ("missing_id", {**GOOD, "id": None}),
    ("missing_label", {**GOOD, "id": "b", "label": None}),
    ("unknown_label", {**GOOD, "id": "c", "label": "maybe"}),
    ("null_feature_value", {**GOOD, "id": "d", "x": None}),
    ("null_feature_value", {**GOOD, "id": "e", "name": None}),
    ("non_finite_value", {**GOOD, "id": "f", "x": math.inf}),
    ("non_finite_value", {**GOOD, "id": "g", "x": -math.inf}),
    ("non_finite_value", {**GOOD, "id": "h", "x": math.nan}),
    ("duplicate_id", {**GOOD, "label": "short"}),
]


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_counts_the_same_reasons_on_the_same_rows(tmp_path, fmt):
    path = write_table(tmp_path / f"d.{fmt}", [GOOD, *(r for _, r in BAD)])
    records, report = load_records(path, LABELS)
    assert [(r.id, r.label, r.features) for r in records] == [("ok", "long", {"x": 1.5, "name": "a"})]
    first = {}
    for i, (reason, _) in enumerate(BAD):
        first.setdefault(reason, i + 2 + (fmt == "csv"))  # CSV counts file lines: the header is line 1
    assert report.as_dict()["dropped_by_reason"] == dict(sorted(Counter(r for r, _ in BAD).items()))
    assert report.as_dict()["first_line_by_reason"] == dict(sorted(first.items()))
    assert (report.rows_read, report.rows_kept) == (len(BAD) + 1, 1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_nulls_allowed_string_features_and_custom_columns(tmp_path, fmt):
    rows = [{"key": "r1", "x": None, "city": "Oslo", "y": "1"}, {"key": "r2", "x": 2, "city": "NA", "y": "0"}]
    path = write_table(tmp_path / f"d.{fmt}", rows, id_column="key", label_column="y")
    records, report = load_records(path, ["0", "1"], allow_null=True, fmt=RowFormat("auto", "key", "y"))
    assert [(r.id, r.label, r.features) for r in records] == [
        ("r1", "1", {"x": None, "city": "Oslo"}),
        ("r2", "0", {"x": 2, "city": "NA"}),
    ]
    assert not report.dropped


@pytest.mark.parametrize("fmt", FORMATS)
def test_int_labels_match_the_configured_names_by_text(tmp_path, fmt):
    path = write_table(tmp_path / f"d.{fmt}", [{"id": i, "label": i % 2, "x": i} for i in range(4)])
    records, report = load_records(path, ["0", "1"])
    assert [r.label for r in records] == ["0", "1", "0", "1"] and not report.dropped


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_ascii_column_name_drops_every_row_as_in_jsonl(tmp_path, fmt):
    path = write_table(tmp_path / f"d.{fmt}", [{"id": i, "label": "long", "é": 1} for i in range(3)])
    _, report = load_records(path, LABELS)
    assert dict(report.dropped) == {"non_ascii_key": 3}


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_leakage_and_split_assembly_work_on_tables(tmp_path, fmt):
    train = write_table(tmp_path / f"train.{fmt}", [{"id": f"t{i}", "label": LABELS[i % 3], "x": i} for i in range(9)])
    val = write_table(
        tmp_path / f"val.{fmt}", [{"id": "t4", "label": "short", "x": 0}, {"id": "v", "label": "skip", "x": 1}]
    )
    splits = build_splits(str(train), str(val), LABELS, leakage="drop")
    assert splits.report["leakage"] == {"ids_in_both": 1, "examples": ["t4"], "policy": "drop"}
    assert len(splits.train) == 8 and splits.report["train_file"]["rows_kept"] == 9


def test_csv_cells_keep_their_spelling_unless_they_are_json_numbers():
    cells = ["", "12", "-1.5", "2e3", "007", "1.", "NA", "null", "True", "false", "t", "Nan", " 1"]
    assert [cell_value(c) for c in cells] == [
        None,
        12,
        -1.5,
        2000.0,
        "007",
        "1.",
        "NA",
        "null",
        True,
        False,
        "t",
        "Nan",
        " 1",
    ]
    assert all(not math.isfinite(cell_value(c)) for c in ["inf", "-inf", "nan", "NaN", "Infinity", "1e999"])


def test_a_pandas_frame_reads_the_same_from_csv_parquet_and_jsonl(tmp_path):
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame(
        {
            "id": ["a", "b", "c"],
            "label": ["long", "short", "skip"],
            "n": [1, 2, 3],
            "x": [0.5, None, 2.0],
            "flag": [True, False, True],
            "s": ["Oslo", None, "007"],
        }
    )
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    frame.to_json(tmp_path / "d.jsonl", orient="records", lines=True)  # flat rows: made into records below
    flat = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    write_table(tmp_path / "d.jsonl", flat)
    read = {
        fmt: [(r.id, r.label, r.features) for r in load_records(tmp_path / f"d.{fmt}", LABELS, allow_null=True)[0]]
        for fmt in FORMATS
    }
    assert read["csv"] == read["parquet"] == read["jsonl"]
    assert read["csv"][1] == ("b", "short", {"n": 2, "x": None, "flag": False, "s": None})


def test_csv_ids_and_labels_are_never_parsed(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("id,label,zip\n007,1,01234\n7,1,5\n")
    records, _ = load_records(path, ["1"])
    assert [(r.id, r.features) for r in records] == [("007", {"zip": "01234"}), ("7", {"zip": 5})]


def test_csv_structural_faults_are_dropped_and_counted(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(
        b"\xef\xbb\xbfid,label,x\n"  # a BOM, as Excel writes
        b"a,long,1\n"
        b"\n"  # blank lines are formatting
        b"b,long\n"  # a cell short
        b"c,long,1,2\n"  # a cell too many
        b"d,long,\xff\n"  # not UTF-8
        b"e,long," + b"9" * 200_000 + b"\n"  # over the csv module's field limit
        b'f,short,"two\nlines"\n'
    )  # a quoted newline is one row
    records, report = load_records(path, LABELS)
    assert [(r.id, r.features) for r in records] == [("a", {"x": 1}), ("f", {"x": "two\nlines"})]
    assert report.as_dict()["first_line_by_reason"] == {"invalid_csv": 7, "invalid_utf8": 6, "wrong_column_count": 4}
    assert dict(report.dropped) == {"wrong_column_count": 2, "invalid_utf8": 1, "invalid_csv": 1}


def test_parquet_types_nested_cells_and_pandas_index(tmp_path):
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame(
        {
            "id": [1, 2, 3],
            "label": ["long", "short", "skip"],
            "when": pd.to_datetime(["2024-01-02", "2024-01-03", "2024-01-04"]),
            "flag": [True, False, True],
            "tags": [[1], [2], [3]],
        },
        index=[10, 11, 12],
    )
    frame.to_parquet(tmp_path / "nested.parquet")  # a non-range index is stored as a column
    _, report = load_records(tmp_path / "nested.parquet", LABELS)
    assert dict(report.dropped) == {"features_not_flat": 3}
    frame.drop(columns="tags").to_parquet(tmp_path / "d.parquet")
    records, _ = load_records(tmp_path / "d.parquet", LABELS)
    assert records[0].id == 1 and records[0].features == {"when": "2024-01-02T00:00:00", "flag": True}


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_header_faults_are_one_line_data_errors(tmp_path, fmt):
    path = write_table(tmp_path / f"d.{fmt}", [{"key": 1, "label": "long", "x": 1}])
    with pytest.raises(DataError, match=r"no id column 'id' \(set data.id_column\)"):
        load_records(path, LABELS)
    with pytest.raises(DataError, match=r"no label column 'target' \(set data.label_column\)"):
        load_records(path, LABELS, fmt=RowFormat("auto", "key", "target"))
    records, _ = load_records(path, None, fmt=RowFormat("auto", "key", "target"))  # predict: no label needed
    assert records[0].features == {"label": "long", "x": 1}
    records, _ = load_records(path, None, fmt=RowFormat("auto", "key"))  # a label column is never a feature
    assert records[0].features == {"x": 1}


def test_csv_unnamed_or_repeated_columns_are_refused(tmp_path):
    (tmp_path / "index.csv").write_text(",id,label,x\n0,a,long,1\n")  # pandas' to_csv with its index
    with pytest.raises(DataError, match="column 1 has no name"):
        load_records(tmp_path / "index.csv", LABELS)
    (tmp_path / "twice.csv").write_text("id,label,x,x\na,long,1,2\n")
    with pytest.raises(DataError, match=r"repeated column names \['x'\]"):
        load_records(tmp_path / "twice.csv", LABELS)


def test_not_parquet_and_explicit_format(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_text("id,label,x\na,long,1\n")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_records(path, LABELS)
    records, _ = load_records(path, LABELS, fmt=RowFormat("csv"))  # data.format overrides the extension
    assert [r.id for r in records] == ["a"]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_prepare_writes_splits_in_the_input_format(tmp_path, fmt):
    rows = [{"id": f"r{i}", "label": LABELS[i % 3], "x": i, "note": None if i % 4 else "n"} for i in range(30)]
    src = write_table(tmp_path / f"all.{fmt}", [*rows, {**rows[0], "label": "skip"}])  # a repeated id
    report = prepare(PrepareConfig(input=str(src), output_dir=str(tmp_path / "out"), seed=1))
    assert report["input"]["dropped_by_reason"] == {"duplicate_id": 1}
    ids = []
    for split in ("train", "val", "test"):
        records, load = load_records(tmp_path / "out" / f"{split}.{fmt}", LABELS, allow_null=True)
        assert not load.dropped and len(records) == report["splits"][split]["rows"]
        ids += [r.id for r in records]
    assert sorted(ids) == sorted(r["id"] for r in rows)
    if fmt == "parquet":
        assert pq.read_schema(tmp_path / "out" / "val.parquet").field("x").type == pa.int64()
