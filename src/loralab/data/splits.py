"""Assembling the train/val splits a run uses, with the report that explains them; the one stratified splitter
(also behind ``loralab.data.prepare`` and the article regression's carved validation split)."""

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

log = logging.getLogger(__name__)


@dataclass
class Splits:
    train: list[Record]  # after oversampling
    val: list[Record]
    report: dict[str, Any]
    train_original: list[Record] = field(default_factory=list)  # train before oversampling (for baselines)


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
) -> Splits:
    """Load, validate, split and balance (``oversample_to``: a share, ``balanced`` or None = off; see
    ``loralab.data.balance``). With ``fmt``'s
    format auto, each file's own extension decides (a CSV train file and a Parquet val file mix)."""
    train, train_report = load_records(train_file, labels, allow_null, fmt, max_row_bytes)
    report: dict[str, Any] = {"labels": list(labels), "train_file": train_report.as_dict()}
    if val_file:
        val, val_report = load_records(val_file, labels, allow_null, fmt, max_row_bytes)
        report["val_file"] = val_report.as_dict()
    else:
        if len(train) < 2:
            raise DataError(f"{train_file}: {len(train)} valid rows, too few to carve a validation split")
        train, val = carve_val(train, val_split, seed)
        report["val_from_train"] = {"val_split": val_split, "seed": seed, "val_ids": [str(r.id) for r in val]}
    for name, rows, key in (("train", train, "train_file"), ("val", val, "val_file" if val_file else "train_file")):
        if not rows:
            read = report[key]
            raise DataError(
                f"{name} split from {read['path']}: no valid rows left after validation ({read['rows_read']} read, "
                f"dropped by reason: {read['dropped_by_reason']}, first line of each: {read['first_line_by_reason']})"
            )

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
    return Splits(train=train, val=val, report=report, train_original=original)
