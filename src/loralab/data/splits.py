"""Assembling the train/val splits a run uses, with the report that explains them."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from sklearn.model_selection import train_test_split

from loralab.data.balance import class_counts, needs_oversampling, oversample
from loralab.data.records import DataError, Record, leaked_ids, load_records

log = logging.getLogger(__name__)


@dataclass
class Splits:
    train: list[Record]  # after oversampling
    val: list[Record]
    report: dict[str, Any]
    train_original: list[Record] = field(default_factory=list)  # train before oversampling (for baselines)


def carve_val(records: Sequence[Record], val_split: float, seed: int) -> tuple[list[Record], list[Record]]:
    """A stratified, seed-fixed validation slice: the same seed always holds out the same ids."""
    strat = [r.label for r in records]
    counts = {label: strat.count(label) for label in set(strat)}
    n_val = math.ceil(val_split * len(records))  # as scikit-learn rounds it
    if not 0 < n_val < len(records):
        raise DataError(f"data.val_split={val_split} of {len(records)} valid rows leaves a split empty")
    if min(counts.values()) < 2 or min(n_val, len(records) - n_val) < len(counts):
        log.warning("too few rows to give each class a place in both splits; carving the validation split "
                    "without stratification")
        strat = None
    train, val = train_test_split(list(records), test_size=val_split, random_state=seed, stratify=strat)
    return train, val


def build_splits(
    train_file: str,
    val_file: str | None,
    labels: Sequence[str],
    *,
    val_split: float = 0.2,
    seed: int = 0,
    oversample_below: float | None = 0.25,
    leakage: str = "warn",
    allow_null: bool = False,
) -> Splits:
    """Load, validate, split and balance. ``oversample_below=None`` switches oversampling off."""
    train, train_report = load_records(train_file, labels, allow_null)
    report: dict[str, Any] = {"labels": list(labels), "train_file": train_report.as_dict()}
    if val_file:
        val, val_report = load_records(val_file, labels, allow_null)
        report["val_file"] = val_report.as_dict()
    else:
        if len(train) < 2:
            raise DataError(f"{train_file}: {len(train)} valid rows, too few to carve a validation split")
        train, val = carve_val(train, val_split, seed)
        report["val_from_train"] = {"val_split": val_split, "seed": seed, "val_ids": [str(r.id) for r in val]}
    for name, rows, path in (("train", train, train_file), ("val", val, val_file or train_file)):
        if not rows:
            raise DataError(f"{name} split from {path}: no valid rows left after validation "
                            f"(see dropped_by_reason in data_report.json)")

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
    if oversample_below is not None and needs_oversampling(before, oversample_below):
        train = oversample(train, labels, seed)
        log.info("oversampled train (a class was under %.0f%%): %s -> %s", 100 * oversample_below,
                 before, class_counts(train, labels))
    report["oversampled"] = len(train) != sum(before.values())
    report["class_counts"]["train_after_oversampling"] = class_counts(train, labels)
    return Splits(train=train, val=val, report=report, train_original=original)
