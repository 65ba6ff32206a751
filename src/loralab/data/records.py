"""Reading and validating JSONL feature records.

A record is ``{"id": ..., "features": {flat: values}, "label": str}``. Every malformed row is dropped and counted
by reason, never raised: one bad line in a million must not kill a run, and the counts tell the user what to fix.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Sequence, TypeVar

from loralab.errors import DataError
from loralab.fs import atomic_path

log = logging.getLogger(__name__)

T = TypeVar("T")

# A row longer than this is dropped (row_too_large) unread: one 50 MB line took 11 GB and two minutes to parse and
# tokenize, and no model reads more than a few thousand tokens of it. 1 MiB is ~250k tokens of text; raise it
# (data.max_row_bytes, max_row_bytes= on the tools) for longer documents.
MAX_ROW_BYTES = 1 << 20
SKIP_CHUNK = 1 << 16  # the rest of a too-large line is read and thrown away in pieces of this size


@dataclass
class Record:
    id: str | int
    features: dict[str, Any]
    label: str | None


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
    rid = row.get("id")
    if rid is None or isinstance(rid, (bool, dict, list, float)) or rid == "":
        return "missing_id"
    return row


def record_from_row(row: dict[str, Any], labels: Sequence[str] | None, allow_null: bool = False) -> Record | str:
    """A feature record, or the reason it is dropped. ``labels=None`` accepts unlabelled rows (inference input)."""
    if "features" not in row:
        return "missing_features"
    reason = _check_features(row["features"], allow_null)
    if reason:
        return reason
    label = row.get("label")
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


def read_rows(path: str | Path, parse: Callable[[dict[str, Any]], T | str], with_text: bool = False,
              max_row_bytes: int = MAX_ROW_BYTES) -> tuple[list[T] | list[tuple[str, T]], LoadReport]:
    """Parse every line of a JSONL file with ``parse``; keep valid rows (the first occurrence of an id wins) and
    count the rest by reason. Shared by every record format, so all of them treat bad input the same way.
    ``with_text`` keeps ``(line text, row)`` pairs, for writers that copy rows verbatim (``data.prepare``).
    A line over ``max_row_bytes`` is dropped as ``row_too_large`` without being read whole."""
    path = check_readable(path)
    report = LoadReport(path=str(path))
    rows = []
    seen: set[str] = set()
    with path.open("rb") as fh:
        for line_no, raw in enumerate(lines(fh, max_row_bytes), start=1):
            if raw is None:
                report.rows_read += 1
                report.drop("row_too_large", line_no)
                continue
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # UTF-8 BOM written by some Windows tools
            if not raw.strip():
                continue  # blank lines are formatting, not rows
            report.rows_read += 1
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
                row = parse_object(text)
            except UnicodeDecodeError:
                row = "invalid_utf8"
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
        log.warning("%s: dropped %d of %d rows: %s", path.name, sum(report.dropped.values()),
                    report.rows_read, dict(report.dropped))
    return rows, report


def write_rows(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """JSONL, one object a line, written atomically: a reader never sees half a file."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)
    return Path(path)


def load_records(
    path: str | Path, labels: Sequence[str] | None, allow_null: bool = False, max_row_bytes: int = MAX_ROW_BYTES
) -> tuple[list[Record], LoadReport]:
    """Feature records of a JSONL file, with the per-reason report of what was dropped."""
    return read_rows(path, lambda row: record_from_row(row, labels, allow_null), max_row_bytes=max_row_bytes)


def leaked_ids(train: Sequence[Record], val: Sequence[Record]) -> list[str]:
    """Ids present in both splits: metrics on them measure memory, not generalisation."""
    return sorted({str(r.id) for r in train} & {str(r.id) for r in val})
