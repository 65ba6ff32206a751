"""Oversampling: train only, minorities up to the largest class, below a share threshold, seeded."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import LABELS, row, write_jsonl

from loralab.data.balance import oversample
from loralab.data.records import Record
from loralab.data.splits import build_splits


def records(counts: dict[str, int]) -> list[Record]:
    return [Record(id=f"{label}-{i}", features={"i": i}, label=label) for label, n in counts.items() for i in range(n)]


def test_oversample_brings_each_present_class_to_the_max():
    original = records({"long": 3, "short": 0, "skip": 11})
    out = oversample(original, LABELS, seed=0)
    assert Counter(r.label for r in out) == {"long": 11, "skip": 11}  # absent "short" stays absent
    assert Counter(id(r) for r in original) <= Counter(id(r) for r in out)  # every original row is kept
    by_id = {r.id: r for r in original}
    assert all(by_id[r.id] is r for r in out)  # additions are copies of existing rows


def test_oversample_is_deterministic_per_seed():
    original = records({"long": 4, "short": 7, "skip": 20})
    ids = [[r.id for r in oversample(original, LABELS, seed)] for seed in (1, 1, 2)]
    assert ids[0] == ids[1] != ids[2]


def write_split_files(tmp_path, train_counts, val_counts):
    def rows(prefix, counts):
        return [row(f"{prefix}{label}{i}", label) for label, n in counts.items() for i in range(n)]

    return (
        str(write_jsonl(tmp_path / "train.jsonl", rows("t", train_counts))),
        str(write_jsonl(tmp_path / "val.jsonl", rows("v", val_counts))),
    )


def test_build_splits_oversamples_train_only(tmp_path):
    train_counts, val_counts = {"long": 2, "short": 5, "skip": 13}, {"long": 1, "short": 2, "skip": 9}
    splits = build_splits(*write_split_files(tmp_path, train_counts, val_counts), LABELS, oversample_below=0.25)
    assert Counter(r.label for r in splits.train) == {label: 13 for label in LABELS}
    assert Counter(r.label for r in splits.val) == val_counts
    counts = splits.report["class_counts"]
    assert counts == {
        "train_before_oversampling": train_counts,
        "val": val_counts,
        "train_after_oversampling": {label: 13 for label in LABELS},
    }
    assert splits.report["oversampled"] is True


@pytest.mark.parametrize(
    ("train_counts", "oversample_below"),
    [
        ({"long": 5, "short": 5, "skip": 10}, 0.25),  # every class holds >= 25%
        ({"long": 2, "short": 5, "skip": 13}, 0.05),  # the smallest class (10%) is above a 5% threshold
        ({"long": 2, "short": 5, "skip": 13}, None),  # switched off
    ],
)
def test_no_oversampling_when_threshold_not_crossed(tmp_path, train_counts, oversample_below):
    files = write_split_files(tmp_path, train_counts, {"long": 1, "short": 1, "skip": 1})
    splits = build_splits(*files, LABELS, oversample_below=oversample_below)
    assert Counter(r.label for r in splits.train) == train_counts
    assert splits.report["oversampled"] is False
    assert splits.report["class_counts"]["train_after_oversampling"] == train_counts


def test_build_splits_oversampling_is_deterministic_per_seed(tmp_path):
    files = write_split_files(tmp_path, {"long": 2, "short": 5, "skip": 13}, {"skip": 1})
    ids = [[r.id for r in build_splits(*files, LABELS, seed=seed).train] for seed in (5, 5, 6)]
    assert ids[0] == ids[1] != ids[2]
