"""Class distributions and random oversampling of minority classes (training split only)."""

from __future__ import annotations

import logging
import random
from collections import Counter
from typing import Sequence

from loralab.data.records import Record

log = logging.getLogger(__name__)


def class_counts(records: Sequence[Record], labels: Sequence[str]) -> dict[str, int]:
    """Counts per label in label order, zeros included, so reports line up across splits."""
    counts = Counter(r.label for r in records)
    return {label: counts.get(label, 0) for label in labels}


def needs_oversampling(counts: dict[str, int], min_share: float) -> bool:
    total = sum(counts.values())
    return total > 0 and any(0 < n < min_share * total for n in counts.values())


def oversample(records: Sequence[Record], labels: Sequence[str], seed: int) -> list[Record]:
    """Duplicate random rows of each present class until it matches the largest class.

    Absent classes stay absent: there is nothing to duplicate, and inventing rows would be worse.
    """
    rng = random.Random(seed)
    by_label: dict[str, list[Record]] = {label: [] for label in labels}
    for record in records:
        by_label[record.label].append(record)
    target = max(len(rows) for rows in by_label.values())
    out = list(records)
    for rows in by_label.values():
        if rows and len(rows) < target:
            out.extend(rng.choices(rows, k=target - len(rows)))
    rng.shuffle(out)
    return out
