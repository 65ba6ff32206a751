"""Reading and validating feature records from JSONL, CSV or Parquet.

A record is ``{"id": ..., "features": {flat: values}, "label": str}``: a JSONL line holds it as is, a table row
(``loralab.data.tables``) is turned into it. Every malformed row is dropped and counted by reason, never raised: one
bad line in a million must not kill a run, and the counts tell the user what to fix.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Sequence, TypeVar

from loralab.data.tables import table_rows
from loralab.errors import DataError
from loralab.fs import atomic_path

log = logging.getLogger(__name__)

T = TypeVar("T")

# A JSONL line longer than this is dropped (row_too_large) unread: one 50 MB line took 11 GB and two minutes to parse
# and tokenize, and no model reads more than a few thousand tokens of it. 1 MiB is ~250k tokens of text; raise it
# (data.max_row_bytes, max_row_bytes= on the tools) for longer documents.
MAX_ROW_BYTES = 1 << 20
SKIP_CHUNK = 1 << 16  # the rest of a too-large line is read and thrown away in pieces of this size


FORMATS = ("jsonl", "csv", "parquet")
SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}  # anything else reads as JSONL, as before


@dataclass(frozen=True)
class RowFormat:
    """How a file holds records: ``format`` auto (by extension) | jsonl | csv | parquet, and for tables the id and
    label column names (a JSONL record names them ``id`` and ``label``)."""

    format: str = "auto"
    id_column: str = "id"
    label_column: str = "label"

    def resolve(self, path: str | Path) -> str:
        if self.format != "auto":
            return self.format
        return SUFFIXES.get(Path(path).suffix.lower(), "jsonl")


JSONL = RowFormat("jsonl")


@dataclass
class Record:
    id: str | int
    features: dict[str, Any]
    label: str | None
    time: float | None = None  # where the record sits in time (loralab.data.timeorder), read for time splits only


@dataclass
class LoadReport:
    """What happened to every line of one file."""

    path: str
    rows_read: int = 0
    rows_kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: dict[str, int] = field(default_factory=dict)  # reason -> first line number seen

    def drop(self, reason: str, line_no: int) -> None:
        self.dropped[reason] += 1
        self.examples.setdefault(reason, line_no)

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "rows_dropped": sum(self.dropped.values()),
            "dropped_by_reason": dict(sorted(self.dropped.items())),
            "first_line_by_reason": dict(sorted(self.examples.items())),
        }


class _NonFinite(ValueError):
    pass


def _reject_constant(name: str) -> float:
    # json.loads accepts NaN/Infinity literals by default; they are not JSON and not usable features.
    raise _NonFinite(name)


def _check_features(features: Any, allow_null: bool) -> str | None:
    """Return the drop reason for a features value, or None when it is valid."""
    if features is None or features == {}:
        return "missing_features"
    if not isinstance(features, dict):
        return "features_not_object"
    for key, value in features.items():
        if not key.isascii():
            return "non_ascii_key"
        if isinstance(value, (dict, list)):
            return "features_not_flat"
        if value is None:
            if not allow_null:
                return "null_feature_value"
        elif isinstance(value, float) and not math.isfinite(value):
            return "non_finite_value"  # e.g. 1e999 parses to inf
        elif not isinstance(value, (bool, int, float, str)):
            return "invalid_feature_value"
    return None


def parse_object(text: str) -> dict[str, Any] | str:
    """A JSON object with a usable ``id``, or the reason the line is dropped."""
    try:
        row = json.loads(text, parse_constant=_reject_constant)
    except _NonFinite:
        return "non_finite_value"
    except (json.JSONDecodeError, RecursionError):
        return "invalid_json"
    if not isinstance(row, dict):
        return "not_object"
    return with_id(row)


def with_id(row: dict[str, Any]) -> dict[str, Any] | str:
    """The row, or ``missing_id`` when its id is absent, empty or not a string or int."""
    rid = row.get("id")
    if rid is None or isinstance(rid, (bool, dict, list, float)) or rid == "":
        return "missing_id"
    return row


def label_text(label: Any) -> Any:
    """Labels match the configured names by their text: an int label ``1`` (JSONL number, Parquet int column) is
    the label ``"1"``, as the same cell in a CSV would be. Other non-strings stay as they are (and match nothing)."""
    return str(label) if isinstance(label, int) and not isinstance(label, bool) else label


def record_from_row(row: dict[str, Any], labels: Sequence[str] | None, allow_null: bool = False) -> Record | str:
    """A feature record, or the reason it is dropped. ``labels=None`` accepts unlabelled rows (inference input)."""
    if "features" not in row:
        return "missing_features"
    reason = _check_features(row["features"], allow_null)
    if reason:
        return reason
    label = label_text(row.get("label"))
    if labels is not None:
        if label is None or label == "":
            return "missing_label"
        if label not in labels:
            return "unknown_label"
    elif label is not None and not isinstance(label, str):
        label = None
    return Record(id=row["id"], features=row["features"], label=label)


def parse_line(text: str, labels: Sequence[str] | None, allow_null: bool = False) -> Record | str:
    """One line into a Record, or the reason it is dropped."""
    row = parse_object(text)
    return row if isinstance(row, str) else record_from_row(row, labels, allow_null)


def lines(fh: IO[bytes], max_bytes: int) -> Iterator[bytes | None]:
    """The lines of a binary file, None for one longer than ``max_bytes``: its rest is skipped in small pieces, so
    memory stays at the cap whatever the line's size."""
    while raw := fh.readline(max_bytes + 1):
        if len(raw) <= max_bytes or raw.endswith(b"\n"):
            yield raw  # (a line of exactly max_bytes plus its newline)
            continue
        while (rest := fh.readline(SKIP_CHUNK)) and not rest.endswith(b"\n"):
            pass
        yield None


def unreadable(path: str | Path) -> str | None:
    """Why ``path`` cannot be read as a data file (a directory, missing, no permission), or None."""
    path = Path(path)
    if path.is_dir():
        return "is a directory, not a file"
    if not path.is_file():
        return "file not found"
    try:
        path.open("rb").close()
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    return None


def check_readable(path: str | Path) -> Path:
    """``DataError`` (one line naming the path) unless ``path`` is a file this process can open."""
    problem = unreadable(path)
    if problem:
        raise DataError(f"{path}: {problem}")
    return Path(path)


def read_rows(
    path: str | Path,
    parse: Callable[[dict[str, Any]], T | str],
    with_text: bool = False,
    fmt: RowFormat = JSONL,
    labelled: bool = True,
    max_row_bytes: int = MAX_ROW_BYTES,
) -> tuple[list[T] | list[tuple[Any, T]], LoadReport]:
    """Parse every row of a file in ``fmt`` with ``parse``; keep valid rows (the first occurrence of an id wins) and
    count the rest by reason. Shared by every record format, so all of them treat bad input the same way.
    ``with_text`` keeps ``(source, row)`` pairs, for writers that copy rows verbatim (``data.prepare``): the line
    text of JSONL, the cells of a CSV row, the row index of Parquet. ``labelled``: a table must have its label
    column. A JSONL line over ``max_row_bytes`` is dropped as ``row_too_large`` without being read whole."""
    path = check_readable(path)
    kind = fmt.resolve(path)
    if kind == "jsonl":
        source_rows = jsonl_rows(path, max_row_bytes)
    else:
        source_rows = (
            (n, src, with_id(row) if isinstance(row, dict) else row)
            for n, src, row in table_rows(path, kind, fmt.id_column, fmt.label_column, labelled)
        )
    report = LoadReport(path=str(path))
    rows = []
    seen: set[str] = set()
    for line_no, text, row in source_rows:
        report.rows_read += 1
        parsed = parse(row) if isinstance(row, dict) else row
        if isinstance(parsed, str):
            report.drop(parsed, line_no)
            continue
        key = str(row["id"])
        if key in seen:
            report.drop("duplicate_id", line_no)
            continue
        seen.add(key)
        rows.append((text, parsed) if with_text else parsed)
    report.rows_kept = len(rows)
    if report.dropped:
        log.warning(
            "%s: dropped %d of %d rows: %s",
            path.name,
            sum(report.dropped.values()),
            report.rows_read,
            dict(report.dropped),
        )
    return rows, report


def jsonl_rows(
    path: Path, max_row_bytes: int = MAX_ROW_BYTES
) -> Iterator[tuple[int, str | None, dict[str, Any] | str]]:
    """(line number, line text, JSON object or drop reason) for every non-blank line."""
    with path.open("rb") as fh:
        for line_no, raw in enumerate(lines(fh, max_row_bytes), start=1):
            if raw is None:
                yield line_no, None, "row_too_large"
                continue
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # UTF-8 BOM written by some Windows tools
            if not raw.strip():
                continue  # blank lines are formatting, not rows
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                yield line_no, None, "invalid_utf8"
                continue
            yield line_no, text, parse_object(text)


def write_rows(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """JSONL, one object a line, written atomically: a reader never sees half a file."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)
    return Path(path)


def load_records(
    path: str | Path,
    labels: Sequence[str] | None,
    allow_null: bool = False,
    fmt: RowFormat = RowFormat(),
    max_row_bytes: int = MAX_ROW_BYTES,
    time: Callable[[Any, dict[str, Any]], float | str] | None = None,
) -> tuple[list[Record], LoadReport]:
    """Feature records of a JSONL, CSV or Parquet file (``fmt``: auto by extension), with the per-reason report of
    what was dropped. ``labels=None``: unlabelled input (predict), a table's label column is optional. ``time``
    (a ``timeorder.TimeReader``) sets each record's time, or gives the reason its row is dropped."""

    def parse(row: dict[str, Any]) -> Record | str:
        record = record_from_row(row, labels, allow_null)
        if isinstance(record, str) or time is None:
            return record
        t = time(record.id, record.features)
        if isinstance(t, str):
            return t
        record.time = t
        return record

    return read_rows(
        path,
        parse,
        fmt=fmt,
        labelled=labels is not None,
        max_row_bytes=max_row_bytes,
    )


def leaked_ids(train: Sequence[Record], val: Sequence[Record]) -> list[str]:
    """Ids present in both splits: metrics on them measure memory, not generalisation."""
    return sorted({str(r.id) for r in train} & {str(r.id) for r in val})
