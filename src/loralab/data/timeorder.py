"""Time-ordered validation: reading each record's time, contiguous blocks, purging and embargo.

Records labelled by what happens after them (a trade's outcome over the next hours) leak the future into a random
split: a val row's label window overlaps the train rows around it, and neighbouring rows share a regime. Following
López de Prado (Advances in Financial Machine Learning, ch. 7), validation is a contiguous block in time; train
rows whose label window ``[t, t + label_horizon]`` overlaps the val block's windows are purged, and train rows that
start within ``embargo`` after the end of the val block's last label window are embargoed. The few lines are
written here rather than taken from a package: the scikit-learn style splitters on PyPI (purgedcv, timeseriescv)
are young single-maintainer packages that take pandas series of label end times and return index arrays, while
loralab needs the purged and embargoed counts for its reports, walk-forward blocks with a rolling cap and times in
records; the logic is twenty lines (``Gap.cut``), tested on hand-counted cases.

A time is a float: the record's position in its file (``time_key`` null: units are records), the number itself
(a numeric feature: its own units), or POSIX seconds (dates and timestamps: ISO text, or text read with
``time_format``; naive times read as UTC). A horizon or embargo in the last case is days when a number, or a
duration such as ``30min``, ``4h``, ``2d``, ``1w`` (``parse_duration``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np

from loralab.errors import DataError

RECORDS, NUMBER, DATETIME = "records", "number", "datetime"
ID_KEY = "id"  # data.time_key=id reads the record's id (the id column of a table), not a feature
DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|min|h|d|w)\s*")
SECONDS = {"s": 1, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
DAY = 86400.0


def parse_duration(text: str) -> float | None:
    """Seconds in ``30min``, ``4h``, ``1.5d``, ``2w``... (units s, min, h, d, w); None when it reads otherwise."""
    m = DURATION.fullmatch(text)
    return float(m.group(1)) * SECONDS[m.group(2)] if m else None


def is_duration(value: Any) -> bool:
    """A horizon or embargo: a number >= 0 (bools are not), or a duration text ``parse_duration`` reads."""
    if isinstance(value, str):
        return parse_duration(value) is not None
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def valid_pattern(text: str) -> bool:
    """A regular expression with at most one group (the time's text: the group, or the whole match)."""
    try:
        return re.compile(text).groups <= 1
    except re.error:
        return False


class TimeReader:
    """The time of each row, as ``read_rows`` parses it: a float, or ``missing_time`` / ``invalid_time``. The
    first valid row decides whether times are numbers or dates (``kind``); a row of the other kind is invalid."""

    def __init__(self, key: str, pattern: str | None = None, fmt: str | None = None) -> None:
        self.key, self.pattern, self.format = key, re.compile(pattern) if pattern else None, fmt
        self.kind: str | None = DATETIME if fmt else None

    def __call__(self, rid: Any, features: dict[str, Any]) -> float | str:
        value = rid if self.key == ID_KEY else features.get(self.key)
        if value is None or value == "":
            return "missing_time"
        if self.pattern is not None:
            m = self.pattern.search(str(value))
            if m is None:
                return "invalid_time"
            value = m.group(1) if self.pattern.groups else m.group(0)
        kind, t = self._read(value)
        if t is None or not math.isfinite(t) or self.kind not in (None, kind):
            return "invalid_time"
        self.kind = kind
        return t

    def _read(self, value: Any) -> tuple[str, float | None]:
        if self.format is not None:
            try:
                return DATETIME, posix(datetime.strptime(str(value), self.format))
            except ValueError:
                return DATETIME, None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return NUMBER, float(value)
        if not isinstance(value, str):
            return NUMBER, None
        try:
            return NUMBER, float(value)
        except ValueError:
            pass
        try:
            return DATETIME, posix(datetime.fromisoformat(value))
        except ValueError:
            return DATETIME, None


def posix(moment: datetime) -> float:
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def time_text(t: float, kind: str) -> str | float:
    """A time as the report shows it: ISO text for dates, the number otherwise."""
    if kind == DATETIME:
        return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")
    return int(t) if kind == RECORDS else t


def in_units(value: float | str, kind: str, key: str) -> float:
    """A horizon or embargo in the units of the times: records, the feature's own, or seconds (days when given as
    a number). A duration text needs dates: ``DataError`` (one line) otherwise."""
    if isinstance(value, str):
        seconds = parse_duration(value)
        if kind != DATETIME or seconds is None:
            raise DataError(f"{key}={value!r}: a duration needs date/time ordering; these times are {kind}")
        return seconds
    return float(value) * DAY if kind == DATETIME else float(value)


@dataclass(frozen=True)
class Gap:
    """Purge and embargo around a validation block, in the units of the times."""

    horizon: float = 0.0
    embargo: float = 0.0
    purge: bool = True

    def cut(self, times: np.ndarray, val_times: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks over ``times`` (the training candidates): kept, purged, embargoed. Purged: the row's label window
        ``[t, t + horizon]`` overlaps the val rows' ``[v_first, v_last + horizon]``. Embargoed: not purged, and it
        starts after the val block, no later than ``embargo`` past the end of its last label window."""
        times = np.asarray(times, dtype=np.float64)
        if len(val_times) == 0:
            none = np.zeros(len(times), dtype=bool)
            return ~none, none, none
        first, last = float(np.min(val_times)), float(np.max(val_times))
        overlaps = (times + self.horizon >= first) & (times <= last + self.horizon)
        purged = overlaps if self.purge else np.zeros(len(times), dtype=bool)
        embargoed = ~purged & (times > last) & (times <= last + self.horizon + self.embargo) & (self.embargo > 0)
        return ~(purged | embargoed), purged, embargoed


def time_order(times: Sequence[float]) -> np.ndarray:
    """Row indices by time, ties in file order (a stable sort)."""
    return np.argsort(np.asarray(times, dtype=np.float64), kind="stable")


def blocks(times: Sequence[float], k: int) -> list[np.ndarray]:
    """``k`` contiguous blocks of row indices in time order, as equal in size as the rows allow (earlier blocks get
    the extra row), each sorted by time."""
    return [b for b in np.array_split(time_order(times), k)]


def purged_folds(
    times: Sequence[float], held_out: Sequence[np.ndarray], gap: Gap
) -> tuple[list[np.ndarray], dict[str, int]]:
    """For each held-out block, the indices that may fit (every other row, purged and embargoed around it), and
    how many rows were purged and embargoed over all blocks: cross-fitting on time-ordered rows (ch. 7.4)."""
    times = np.asarray(times, dtype=np.float64)
    fit_rows, counts = [], {"purged": 0, "embargoed": 0}
    for held in held_out:
        rest = np.setdiff1d(np.arange(len(times)), held)
        kept, purged, embargoed = gap.cut(times[rest], times[held])
        fit_rows.append(rest[kept])
        counts["purged"] += int(purged.sum())
        counts["embargoed"] += int(embargoed.sum())
    return fit_rows, counts
