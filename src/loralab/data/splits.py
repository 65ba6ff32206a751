"""Assembling the train/val splits a run uses, with the report that explains them; the one stratified splitter
(also behind ``loralab.data.prepare`` and the article regression's carved validation split) and the time-ordered
one (``TimeSplit``: split=time | walk_forward, purged and embargoed; ``loralab.data.timeorder``)."""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence

import numpy as np
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import KBinsDiscretizer

from loralab.data.balance import class_counts, duplication, oversample
from loralab.data.records import MAX_ROW_BYTES, DataError, Record, RowFormat, leaked_ids, load_records
from loralab.data.timeorder import NUMBER, RECORDS, Gap, TimeReader, blocks, in_units, time_order, time_text

log = logging.getLogger(__name__)


@dataclass
class Splits:
    train: list[Record]  # after oversampling
    val: list[Record]
    report: dict[str, Any]
    train_original: list[Record] = field(default_factory=list)  # train before oversampling (for baselines)
    gap: Gap | None = None  # purge and embargo in the records' time units, under split=time | walk_forward


def split_off(strata: Sequence[Hashable], n_held: int, seed: int) -> tuple[list[int], list[int], bool]:
    """Indices (kept, held out) of ``range(len(strata))`` with ``n_held`` held out, and whether the split is
    stratified. It is, unless a stratum could not have a row on both sides (scikit-learn's own conditions, checked
    first so nothing else is caught); then it is a plain shuffle. Same seed, same split."""
    idx = np.arange(len(strata))
    if n_held <= 0:
        return idx.tolist(), [], True
    counts = Counter(strata)
    stratify = min(counts.values()) >= 2 and min(n_held, len(idx) - n_held) >= len(counts)
    if not stratify:
        log.warning(
            "too few rows to give each stratum a place on both sides of a %d/%d split; splitting without "
            "stratification",
            len(idx) - n_held,
            n_held,
        )
    kept, held = train_test_split(idx, test_size=n_held, random_state=seed, stratify=list(strata) if stratify else None)
    return kept.tolist(), held.tolist(), stratify


def stratified_split(
    strat: Sequence[Hashable], ratios: dict[str, float], seed: int
) -> tuple[dict[str, list[int]], bool]:
    """Row indices per split (``train``, ``val``, optionally ``test``), each list in file order, and whether both
    cuts were stratified. Held-out sizes are rounded from the whole file (not from what is left), so 0.7/0.2/0.1
    of 100 rows is exactly 70/20/10."""
    n = len(strat)
    rest, test, ok_test = split_off(strat, round(ratios.get("test", 0.0) * n), seed)
    train, val, ok_val = split_off([strat[i] for i in rest], round(ratios["val"] * n), seed)
    out = {"train": sorted(rest[i] for i in train), "val": sorted(rest[i] for i in val)}
    if "test" in ratios:
        out["test"] = sorted(test)
    return out, ok_test and ok_val


def test_overlap(test: Sequence, **splits: Sequence) -> dict[str, int]:
    """How many test ids are also in each other split (rows with an ``id``). Counted and warned about, never
    dropped: the test file is scored as given, and the count says how far to trust it."""
    out = {f"ids_in_{name}": len(leaked_ids(rows, test)) for name, rows in splits.items()}
    if any(out.values()):
        log.warning("data.test_file shares ids with other splits (%s): its scores partly measure memory", out)
    return out


def score_tiers(scores: Sequence[float], n_tiers: int) -> tuple[list[str], list[float]]:
    """Quantile tier of each score (``tier_0`` lowest) and the tier edges: the strata of regression rows, so every
    split sees low, middle and high scores alike."""
    values = np.asarray(scores, dtype=np.float64).reshape(-1, 1)
    if n_tiers <= 1 or np.ptp(values) == 0:
        return ["tier_0"] * len(values), [float(values.min()), float(values.max())]
    binner = KBinsDiscretizer(n_bins=n_tiers, encode="ordinal", strategy="quantile", subsample=None)
    tiers = binner.fit_transform(values)[:, 0].astype(int)
    return [f"tier_{t}" for t in tiers], [float(e) for e in binner.bin_edges_[0]]


def carve_val(records: Sequence[Record], val_split: float, seed: int) -> tuple[list[Record], list[Record]]:
    """A stratified, seed-fixed validation slice: the same seed always holds out the same ids, in the same order
    (scikit-learn's draw order, not file order: runs made before this splitter was shared train alike)."""
    n_val = math.ceil(val_split * len(records))  # as scikit-learn rounds a fraction
    if not 0 < n_val < len(records):
        raise DataError(f"data.val_split={val_split} of {len(records)} valid rows leaves a split empty")
    train, val, _ = split_off([r.label for r in records], n_val, seed)
    return [records[i] for i in train], [records[i] for i in val]


@dataclass(frozen=True)
class TimeSplit:
    """How records are ordered in time and cut (``data.split``, ``data.time_*``... of ``RecordsDataConf``):
    ``split`` random (times are read for the report and the overlap check only), time or walk_forward."""

    split: str = "time"
    time_key: str | None = None  # None: file order (the val file's rows after the train file's)
    time_pattern: str | None = None
    time_format: str | None = None
    label_horizon: float | str = 0
    embargo: float | str = 0
    purge: bool = True
    folds: int = 5
    fold: int = 1
    max_train: int | None = None

    def reader(self) -> TimeReader | None:
        return TimeReader(self.time_key, self.time_pattern, self.time_format) if self.time_key else None

    def carve(self, train: list[Record], val_split: float) -> tuple[list[Record], list[Record], int]:
        """(train, val, rows left unused) from the train file's records: the last ``val_split`` in time
        (split=time), or block ``fold`` of ``folds`` with the blocks before it (walk_forward; later blocks unused)."""
        times = [r.time for r in train]
        if self.split == "time":
            order = time_order(times)
            n_val = math.ceil(val_split * len(train))
            if not 0 < n_val < len(train):
                raise DataError(f"data.val_split={val_split} of {len(train)} valid rows leaves a split empty")
            return [train[i] for i in order[:-n_val]], [train[i] for i in order[-n_val:]], 0
        parts = blocks(times, self.folds)
        if len(parts[-1]) == 0:
            raise DataError(f"data.folds={self.folds}: more blocks than the {len(train)} valid train rows")
        past = np.concatenate(parts[: self.fold])
        return [train[i] for i in past], [train[i] for i in parts[self.fold]], sum(map(len, parts[self.fold + 1 :]))

    def cut(
        self, train: list[Record], val: list[Record], kind: str, val_from_file: bool
    ) -> tuple[list[Record], dict[str, Any], Gap]:
        """Train purged and embargoed around val (and rolled to ``max_train``), in time order, with its report."""
        horizon = in_units(self.label_horizon, kind, "data.label_horizon")
        gap = Gap(horizon, in_units(self.embargo, kind, "data.embargo"), self.purge)
        counts = {"purged": 0, "embargoed": 0, "dropped_by_max_train": 0}
        if self.split != "random":
            train = [train[i] for i in time_order([r.time for r in train])]
            kept, purged, embargoed = gap.cut(np.array([r.time for r in train]), np.array([r.time for r in val]))
            train = [r for r, keep in zip(train, kept) if keep]
            counts.update(purged=int(purged.sum()), embargoed=int(embargoed.sum()))
            if self.max_train is not None and len(train) > self.max_train:
                counts["dropped_by_max_train"] = len(train) - self.max_train
                train = train[-self.max_train :]
            if not train:
                raise DataError(
                    f"data.split={self.split}: no train rows left before the val block ({counts['purged']} purged "
                    f"by data.label_horizon={self.label_horizon!r}, {counts['embargoed']} embargoed)"
                )
        report = {
            "split": self.split,
            "time_key": self.time_key,
            "time_pattern": self.time_pattern,
            "time_format": self.time_format,
            "times": kind,
            "label_horizon": self.label_horizon,
            "embargo": self.embargo,
            "purge": self.purge,
            "gap_in_time_units": {"horizon": gap.horizon, "embargo": gap.embargo},
            **({"folds": self.folds, "fold": self.fold} if self.split == "walk_forward" else {}),
            "max_train": self.max_train,
            "train": time_range(train, kind),
            "val": time_range(val, kind),
            **counts,
        }
        if val_from_file:
            report["overlap"] = time_overlap(train, val, kind)
        return train, report, gap


def time_range(rows: Sequence[Record], kind: str) -> dict[str, Any]:
    times = [r.time for r in rows if r.time is not None]
    if not times:
        return {"rows": len(rows), "first": None, "last": None}
    return {"rows": len(rows), "first": time_text(min(times), kind), "last": time_text(max(times), kind)}


def time_overlap(train: Sequence[Record], val: Sequence[Record], kind: str) -> dict[str, Any]:
    """Train rows at or after the val file's first time: a train file that reaches into the val file's period
    trains on the future of some val rows (warned, like ids in both splits)."""
    first = min(r.time for r in val)  # type: ignore[type-var]
    late = [r for r in train if r.time is not None and r.time >= first]
    if late:
        log.warning(
            "train and val files overlap in time: %d train rows at or after the val file's first time %s "
            "(train runs to %s); their scores partly measure the future",
            len(late),
            time_text(first, kind),
            time_text(max(r.time for r in late), kind),  # type: ignore[type-var]
        )
    return {"train_rows_at_or_after_val_start": len(late), "val_first": time_text(first, kind)}


def build_splits(
    train_file: str,
    val_file: str | None,
    labels: Sequence[str],
    *,
    val_split: float = 0.2,
    seed: int = 0,
    oversample_to: float | str | None = None,
    leakage: str = "warn",
    allow_null: bool = False,
    fmt: RowFormat = RowFormat(),
    max_row_bytes: int = MAX_ROW_BYTES,
    time: TimeSplit | None = None,
) -> Splits:
    """Load, validate, split and balance (``oversample_to``: a share, ``balanced`` or None = off; see
    ``loralab.data.balance``). With ``fmt``'s format auto, each file's own extension decides (a CSV train file and
    a Parquet val file mix). ``time``: read each record's time and, unless its split is random, cut val as a block
    in time with purge and embargo."""
    reader = time.reader() if time else None
    train, train_report = load_records(train_file, labels, allow_null, fmt, max_row_bytes, reader)
    report: dict[str, Any] = {"labels": list(labels), "train_file": train_report.as_dict()}
    if val_file:
        val, val_report = load_records(val_file, labels, allow_null, fmt, max_row_bytes, reader)
        report["val_file"] = val_report.as_dict()
    if time is not None and reader is None:  # file order: the val file's rows come after the train file's
        for i, r in enumerate([*train, *(val if val_file else [])]):
            r.time = float(i)
    if not val_file:
        if len(train) < 2:
            raise DataError(f"{train_file}: {len(train)} valid rows, too few to carve a validation split")
        if time is None or time.split == "random":
            train, val = carve_val(train, val_split, seed)
            report["val_from_train"] = {"val_split": val_split, "seed": seed, "val_ids": [str(r.id) for r in val]}
        else:
            train, val, unused = time.carve(train, val_split)
            report["val_from_train"] = {"split": time.split, "val_split": val_split, "unused_later_rows": unused}
    for name, rows, key in (("train", train, "train_file"), ("val", val, "val_file" if val_file else "train_file")):
        if not rows:
            read = report[key]
            raise DataError(
                f"{name} split from {read['path']}: no valid rows left after validation ({read['rows_read']} read, "
                f"dropped by reason: {read['dropped_by_reason']}, first line of each: {read['first_line_by_reason']})"
            )

    gap = None
    if time is not None and train and val:
        kind = (reader.kind or NUMBER) if reader else RECORDS
        train, report["time_split"], gap = time.cut(train, val, kind, bool(val_file))
        gap = None if time.split == "random" else gap
    leaks = leaked_ids(train, val)
    report["leakage"] = {"ids_in_both": len(leaks), "examples": leaks[:20], "policy": leakage}
    if leaks:
        message = f"{len(leaks)} ids appear in both train and val (e.g. {leaks[:3]})"
        if leakage == "error":
            raise DataError(message)
        if leakage == "drop":
            leaked = set(leaks)
            train = [r for r in train if str(r.id) not in leaked]
            message += "; dropped from train"
            if not train:
                raise DataError(f"data.leakage=drop removed every training row: all {len(leaks)} train ids are in val")
        log.warning(message)

    original = list(train)
    before = class_counts(train, labels)
    report["class_counts"] = {"train_before_oversampling": before, "val": class_counts(val, labels)}
    if oversample_to is not None:
        train = oversample(train, labels, seed, oversample_to)
    after = class_counts(train, labels)
    report["oversampled"] = len(train) != sum(before.values())
    report["class_counts"]["train_after_oversampling"] = after
    report["oversampling"] = {"to": oversample_to, "duplication": round(duplication(before, after), 3)}
    if report["oversampled"]:
        log.info(
            "oversampled train to %s: %s -> %s (minority rows seen up to %.1fx an epoch)",
            oversample_to,
            before,
            after,
            report["oversampling"]["duplication"],
        )
    return Splits(train=train, val=val, report=report, train_original=original, gap=gap)
