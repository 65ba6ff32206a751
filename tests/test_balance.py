"""Oversampling: train only, minorities up to a share of the final set or to the largest class, every original row
kept, copies spread evenly, seeded."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import LABELS, row, write_jsonl

from loralab.data.balance import oversample, oversampled_counts
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
    splits = build_splits(*write_split_files(tmp_path, train_counts, val_counts), LABELS, oversample_to="balanced")
    assert Counter(r.label for r in splits.train) == {label: 13 for label in LABELS}
    assert Counter(r.label for r in splits.val) == val_counts
    counts = splits.report["class_counts"]
    assert counts == {
        "train_before_oversampling": train_counts,
        "val": val_counts,
        "train_after_oversampling": {label: 13 for label in LABELS},
    }
    assert splits.report["oversampled"] is True
    assert splits.report["oversampling"] == {"to": "balanced", "duplication": 6.5}  # long: 2 rows -> 13


@pytest.mark.parametrize(
    ("counts", "to", "expected"),
    [
        # 6% minorities raised to a quarter of the final set: 100 / (1 - 2 * 0.25) = 200 rows, 50 each
        ({"long": 6, "short": 7, "skip": 100}, 0.25, {"long": 50, "short": 50, "skip": 100}),
        # only the class under the share moves; the 30% class keeps its rows
        ({"long": 5, "short": 30, "skip": 65}, 0.2, {"long": 24, "short": 30, "skip": 65}),
        # raising one class pulls another under the share: both raised (30 -> 37 of 150 total with 0.25)
        ({"long": 2, "short": 30, "skip": 75}, 0.25, {"long": 38, "short": 38, "skip": 75}),
        # a share every class needs cannot hold for all: balanced
        ({"long": 10, "short": 20, "skip": 30}, 0.45, {"long": 30, "short": 30, "skip": 30}),
        ({"long": 3, "short": 0, "skip": 11}, 0.25, {"long": 4, "short": 0, "skip": 11}),  # absent stays absent
        ({"long": 3, "short": 0, "skip": 11}, "balanced", {"long": 11, "short": 0, "skip": 11}),
        ({"long": 30, "short": 30, "skip": 40}, 0.25, {"long": 30, "short": 30, "skip": 40}),  # nothing under it
    ],
)
def test_oversampling_to_a_share_gives_exact_counts_and_keeps_every_row(counts, to, expected):
    assert oversampled_counts(counts, to) == expected
    original = records(counts)
    out = oversample(original, LABELS, seed=0, to=to)
    assert Counter(r.label for r in out) == {k: v for k, v in expected.items() if v}
    assert Counter(r.id for r in original) <= Counter(r.id for r in out)  # never drops a row
    for label in LABELS:  # copies spread evenly: every row of a class seen floor or ceil of the factor
        seen = Counter(r.id for r in out if r.label == label).values()
        assert not seen or max(seen) - min(seen) <= 1


def test_a_rare_minority_is_duplicated_half_as_often_at_a_quarter_share(tmp_path):
    """The trading shape: long/short ~6% each. A quarter share sees each minority row ~7x an epoch where full
    balance sees it ~14x; val is never oversampled."""
    train_counts, val_counts = {"long": 190, "short": 208, "skip": 2602}, {"long": 60, "short": 70, "skip": 870}
    files = write_split_files(tmp_path, train_counts, val_counts)
    quarter = build_splits(*files, LABELS, oversample_to=0.25)
    balanced = build_splits(*files, LABELS, oversample_to="balanced")
    assert quarter.report["oversampling"]["duplication"] == pytest.approx(1301 / 190, abs=1e-3)  # 2602/(1-2*.25)/4
    assert balanced.report["oversampling"]["duplication"] == pytest.approx(2602 / 190, abs=1e-3)
    for splits in (quarter, balanced):
        assert Counter(r.label for r in splits.val) == val_counts
        assert len(splits.train_original) == sum(train_counts.values())


@pytest.mark.parametrize(
    ("train_counts", "oversample_to"),
    [
        ({"long": 5, "short": 5, "skip": 10}, 0.25),  # every class holds >= 25%
        ({"long": 2, "short": 5, "skip": 13}, 0.05),  # the smallest class (10%) is above a 5% share
        ({"long": 2, "short": 5, "skip": 13}, None),  # switched off
    ],
)
def test_no_oversampling_when_no_class_is_under_the_share(tmp_path, train_counts, oversample_to):
    files = write_split_files(tmp_path, train_counts, {"long": 1, "short": 1, "skip": 1})
    splits = build_splits(*files, LABELS, oversample_to=oversample_to)
    assert [r.id for r in splits.train] == [r.id for r in splits.train_original]  # file order kept
    assert splits.report["oversampled"] is False
    assert splits.report["class_counts"]["train_after_oversampling"] == train_counts


def test_build_splits_oversampling_is_deterministic_per_seed(tmp_path):
    files = write_split_files(tmp_path, {"long": 2, "short": 5, "skip": 13}, {"skip": 1})
    ids = [[r.id for r in build_splits(*files, LABELS, seed=seed, oversample_to=0.25).train] for seed in (5, 5, 6)]
    assert ids[0] == ids[1] != ids[2]
