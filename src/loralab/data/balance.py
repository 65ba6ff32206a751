"""Class distributions and random oversampling of minority classes (training split only)."""

from __future__ import annotations

import logging
import random
from collections import Counter
from typing import Sequence

from loralab.data.records import Record

log = logging.getLogger(__name__)

BALANCED = "balanced"


def class_counts(records: Sequence[Record], labels: Sequence[str]) -> dict[str, int]:
    """Counts per label in label order, zeros included, so reports line up across splits."""
    counts = Counter(r.label for r in records)
    return {label: counts.get(label, 0) for label in labels}


def oversampled_counts(counts: dict[str, int], to: float | str) -> dict[str, int]:
    """The class counts after oversampling ``to`` a share of the training set, or to the largest class (``balanced``).

    A share ``s`` raises each present class under ``s`` of the *final* set to exactly that share, the others keep
    their counts: with the raised classes ``k`` and the rest ``R`` rows, the final size is ``R / (1 - k s)``. Raising
    classes grows the set, which can pull another class under the share, so the raised set is found by iterating
    (it only grows). Absent classes stay absent: there is nothing to duplicate."""
    present = {label: n for label, n in counts.items() if n > 0}
    if to == BALANCED:
        target = max(present.values(), default=0)
        return {label: max(n, target) if n else 0 for label, n in counts.items()}
    share = float(to)
    raised: set[str] = set()
    while True:
        rest = sum(n for label, n in present.items() if label not in raised)
        total = rest / (1 - len(raised) * share) if raised else sum(present.values())
        now = {label for label, n in present.items() if n < share * total}
        if now <= raised:
            break
        raised |= now
        if len(raised) * share >= 1:  # every class raised: the share cannot hold for all, balance instead
            return oversampled_counts(counts, BALANCED)
    target = round(share * total)
    return {label: max(n, target) if label in raised else n for label, n in counts.items()}


def oversample(records: Sequence[Record], labels: Sequence[str], seed: int, to: float | str = BALANCED) -> list[Record]:
    """Every original row once, plus copies of minority rows up to ``oversampled_counts(.., to)``, shuffled.

    Copies are spread evenly: a class raised ×3.4 has each row 3 or 4 times, never one row 10 times and another
    once (random draws with replacement would make some rows far more memorable than others)."""
    rng = random.Random(seed)
    by_label: dict[str, list[Record]] = {label: [] for label in labels}
    for record in records:
        by_label[record.label].append(record)
    counts = {label: len(rows) for label, rows in by_label.items()}
    targets = oversampled_counts(counts, to)
    out = list(records)
    if targets == counts:
        return out  # nothing to raise: the file order stays
    for label, rows in by_label.items():
        extra = targets[label] - len(rows)
        if extra > 0:
            out.extend(rows * (extra // len(rows)) + rng.sample(rows, extra % len(rows)))
    rng.shuffle(out)
    return out


def duplication(before: dict[str, int], after: dict[str, int]) -> float:
    """How many times the most oversampled class's rows are seen per epoch, on average (1.0: none)."""
    return max((after[label] / n for label, n in before.items() if n), default=1.0)
