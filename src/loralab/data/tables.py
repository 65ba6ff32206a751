"""CSV and Parquet input: each table row becomes the ``{"id", "features", "label"}`` object a JSONL line holds, so
``records.read_rows`` validates, counts and deduplicates every format the same way.

Columns: ``id_column`` and ``label_column`` (when present) are the id and the label; every other column is a
feature, the same set in every row. How cells become values:

- CSV (stdlib ``csv``, streamed row by row): an empty cell is null; a cell written as a JSON number (``12``,
  ``-1.5``, ``2e3``) is that number; ``true``/``false`` in JSON's, Python's (pandas') or upper case are booleans;
  the spellings pandas, numpy and SQL write for non-finite floats (``inf``, ``-inf``, ``nan``, ``NaN``,
  ``Infinity``...) are non-finite numbers, dropped as in JSONL; every other cell is its text as written (``007``,
  ``NA``, ``null``, ``t``, ``Nan`` stay strings). So a pandas frame reads the same from ``to_csv(index=False)``
  as from ``to_parquet`` (tested). The rule looks at the cell alone, never at its column: a row's text is the same
  whichever file it sits in (train, val or a predict file of one row), which per-column inference (pandas) cannot
  promise, and ids keep their spelling (``007`` is not ``7.0``). The id and label cells are never parsed.
- Parquet (pyarrow, streamed by record batch): the column types decide; null is null, NaN is a non-finite value
  (dropped as in JSONL), dates and times become ISO text, decimals floats; list or struct cells are not flat.
  A pandas index stored as a column (``__index_level_0__``) is not a feature.

Labels match the configured names by their text, in every format (``records.label_text``): an int label ``1`` is
the label ``"1"``.
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import json
import re
from pathlib import Path
from typing import Any, Iterator

from loralab.errors import DataError
from loralab.fs import atomic_path

# JSON's number grammar: what a JSONL writer would have written unquoted.
JSON_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
NON_FINITE = {s: float(s) for s in ("inf", "+inf", "-inf", "nan", "-nan", "NaN", "Infinity", "+Infinity", "-Infinity")}
WORDS = {**NON_FINITE, **{s: True for s in ("true", "True", "TRUE")}, **{s: False for s in ("false", "False", "FALSE")}}
PARQUET_BATCH_ROWS = 4096  # rows converted to Python at a time: memory stays flat in the file's length

# (line or row number, the row's source for verbatim copies, the row object or the reason it is dropped)
TableRow = tuple[int, Any, "dict[str, Any] | str"]


def cell_value(text: str) -> int | float | str | None:
    """A CSV cell as the value a JSONL writer would have written (see the module docstring)."""
    if text == "":
        return None
    if JSON_NUMBER.fullmatch(text):
        return json.loads(text)  # 1e999 is inf here, and dropped as non_finite_value like in JSONL
    return WORDS.get(text, text)


def check_header(path: Path, names: list[str], id_column: str, label_column: str, labelled: bool) -> None:
    """Columns that make every row unusable are a file error (one line), not a drop count per row."""
    where = f"{path}: columns {names[:20]}"
    if len(set(names)) != len(names):
        raise DataError(f"{where}: repeated column names {sorted({n for n in names if names.count(n) > 1})}")
    if "" in names:
        raise DataError(
            f"{where}: column {names.index('') + 1} has no name (a pandas index? write with index=False, or name it)"
        )
    if id_column not in names:
        raise DataError(f"{where}: no id column {id_column!r} (set data.id_column)")
    if labelled and label_column not in names:
        raise DataError(f"{where}: no label column {label_column!r} (set data.label_column)")


def as_record(cells: dict[str, Any], id_column: str, label_column: str) -> dict[str, Any]:
    features = {k: v for k, v in cells.items() if k not in (id_column, label_column)}
    return {"id": cells[id_column], "features": features, "label": cells.get(label_column)}


def csv_rows(path: Path, id_column: str, label_column: str, labelled: bool) -> Iterator[TableRow]:
    """Rows of a CSV with a header line. A row with more or fewer cells than the header is ``wrong_column_count``,
    one the csv module cannot parse (e.g. a field over its size limit) ``invalid_csv``, one with bytes that are not
    UTF-8 ``invalid_utf8``; blank lines are formatting. Numbers are the file's line numbers (the header is 1)."""
    # surrogateescape: undecodable bytes survive as lone surrogates, so one bad row is dropped, not the file
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        reader = csv.reader(fh)
        try:
            names = next(reader, None)
        except csv.Error as err:
            raise DataError(f"{path}: unreadable CSV header ({err})") from None
        if names is None:
            return
        if _has_surrogates(names):
            raise DataError(f"{path}: the header is not UTF-8")
        check_header(path, names, id_column, label_column, labelled)
        while True:
            start = reader.line_num + 1
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error:
                yield start, None, "invalid_csv"
                continue
            if not cells:
                continue
            if _has_surrogates(cells):
                yield start, cells, "invalid_utf8"
            elif len(cells) != len(names):
                yield start, cells, "wrong_column_count"
            else:
                yield (
                    start,
                    cells,
                    as_record(
                        {
                            n: (c or None) if n in (id_column, label_column) else cell_value(c)
                            for n, c in zip(names, cells)
                        },
                        id_column,
                        label_column,
                    ),
                )


def _has_surrogates(cells: list[str]) -> bool:
    try:
        "".join(cells).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def python_value(value: Any) -> Any:
    """Arrow scalars as JSON-like values: ISO text for dates and times, floats for decimals."""
    if isinstance(value, (dt.date, dt.time)):  # datetime is a date
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return float(value)
    return value


def parquet_rows(path: Path, id_column: str, label_column: str, labelled: bool) -> Iterator[TableRow]:
    """Rows of a Parquet file, numbered from 1."""
    import pyarrow.parquet as pq  # only a Parquet input pays for importing pyarrow

    try:
        pf = pq.ParquetFile(path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path}: not a readable Parquet file ({str(err).splitlines()[0]})") from None
    pandas_meta = pf.schema_arrow.pandas_metadata or {}
    index_columns = {c for c in pandas_meta.get("index_columns", []) if isinstance(c, str)}
    names = [n for n in pf.schema_arrow.names if n not in index_columns]
    check_header(path, names, id_column, label_column, labelled)
    row_no = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=names):
        for cells in batch.to_pylist():
            row_no += 1
            yield row_no, row_no - 1, as_record({k: python_value(v) for k, v in cells.items()}, id_column, label_column)


READERS = {"csv": csv_rows, "parquet": parquet_rows}


def table_rows(path: Path, fmt: str, id_column: str, label_column: str, labelled: bool) -> Iterator[TableRow]:
    """The rows of a CSV or Parquet file as record objects (or drop reasons). ``labelled``: the label column must
    exist (training, evaluation); without it a label column, if present, is still left out of the features."""
    return READERS[fmt](Path(path), id_column, label_column, labelled)


def write_table_subset(src: Path, fmt: str, sources: list[Any], dest: Path) -> Path:
    """The rows whose sources ``table_rows`` gave (CSV cells, Parquet row indices), in the format of ``src``,
    header and column types kept: the split files ``loralab-prepare`` writes for a table."""
    with atomic_path(dest) as tmp:
        if fmt == "csv":
            with src.open(encoding="utf-8-sig", newline="") as fh:
                header = next(csv.reader(fh))
            with tmp.open("w", encoding="utf-8", newline="") as out:
                writer = csv.writer(out)
                writer.writerow(header)
                writer.writerows(sources)
        else:
            import pyarrow.parquet as pq

            pq.write_table(pq.read_table(src).take(sources), tmp)
    return dest
