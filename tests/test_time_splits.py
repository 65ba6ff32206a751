"""Time-ordered validation: split=time | walk_forward, purge and embargo, times read from ids or features, the
blend's cross-fit folds in time, and a walk-forward sweep summarised per setting over its folds."""

from __future__ import annotations

import logging
import random

import numpy as np
from conftest import LABELS, row, shipped_conf, write_jsonl

from loralab.baseline import fit_baseline
from loralab.data.demo import write_demo
from loralab.data.splits import TimeSplit, build_splits
from loralab.data.timeorder import Gap, blocks, parse_duration, purged_folds
from loralab.ensemble import cross_fit, folds

TWO = ["long", "short"]


def drifting_rows(n: int, seed: int) -> list[dict]:
    """Rows in time order whose label rule drifts: long when x is over a threshold that climbs from 0.1 to 0.9;
    ``level`` follows time (as a price level or a volatility regime does), so rows near each other in time share
    their threshold."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        f, x = i / n, rng.random()
        features = {"x": round(x, 4), "level": round(f + rng.gauss(0, 0.02), 4), "noise": round(rng.random(), 3)}
        rows.append({"id": f"t-{i:06d}", "features": features, "label": "long" if x > 0.1 + 0.8 * f else "short"})
    return rows


def test_random_split_scores_clearly_higher_than_the_time_split_under_drift(tmp_path):
    path = write_jsonl(tmp_path / "drift.jsonl", drifting_rows(600, seed=0))
    scores = {}
    for split, time in (("random", None), ("time", TimeSplit("time"))):
        s = build_splits(str(path), None, TWO, val_split=0.2, seed=0, time=time)
        scores[split] = fit_baseline("hgb", s.train_original, s.val, TWO, 0, {}, 1)["scalars"]["val_macro_f1"]
    # The random split's val rows sit between train rows of the same regime; the time split's val is a regime
    # no train row saw. The same records, the same model: the gap is what a random split overstates.
    assert scores["random"] > 0.94 and scores["time"] < 0.85, scores
    assert scores["random"] - scores["time"] > 0.1, scores


def test_time_split_val_is_the_last_rows_and_purges_the_label_horizon(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [row(f"r{i:02d}", LABELS[i % 3]) for i in range(20)])
    s = build_splits(str(path), None, LABELS, val_split=0.25, time=TimeSplit("time", label_horizon=3))
    assert [r.id for r in s.val] == [f"r{i:02d}" for i in range(15, 20)]  # file order: the last 5
    assert [r.id for r in s.train_original] == [f"r{i:02d}" for i in range(12)]  # 12, 13, 14 look into val
    t = s.report["time_split"]
    assert (t["purged"], t["embargoed"], t["times"]) == (3, 0, "records")
    assert t["train"] == {"rows": 12, "first": 0, "last": 11} and t["val"] == {"rows": 5, "first": 15, "last": 19}
    assert s.gap == Gap(3.0, 0.0, True)
    unpurged = build_splits(
        str(path), None, LABELS, val_split=0.25, time=TimeSplit("time", label_horizon=3, purge=False)
    )
    assert len(unpurged.train_original) == 15 and unpurged.report["time_split"]["purged"] == 0


def test_gap_purges_and_embargoes_exactly_around_a_block():
    times = np.arange(20.0)
    val = times[8:12]  # 8..11
    kept, purged, embargoed = Gap(horizon=2, embargo=3).cut(times, val)
    # Label windows [t, t + 2] meet the val block's [8, 13]: 6 and 7 before it, 12 and 13 after (and the block).
    assert np.flatnonzero(purged).tolist() == [6, 7, 8, 9, 10, 11, 12, 13]
    assert np.flatnonzero(embargoed).tolist() == [14, 15, 16]  # start within 3 after the last window ends (13)
    assert np.flatnonzero(kept).tolist() == [0, 1, 2, 3, 4, 5, 17, 18, 19]
    _, purged, embargoed = Gap(horizon=2, embargo=0, purge=False).cut(times, val)
    assert not purged[:8].any() and not embargoed.any()
    assert (parse_duration("4h"), parse_duration("1.5d"), parse_duration("30min"), parse_duration("4x")) == (
        14400.0,
        129600.0,
        1800.0,
        None,
    )


def test_times_read_from_ids_by_pattern_and_format_and_unreadable_rows_counted(tmp_path):
    days = ["20251120", "20251121", "20251121", "20251122", "20251123", "20251124", "20251124", "20251125"]
    rows = [row(f"6E-M1-{d}-{10000 + i}", LABELS[i % 3]) for i, d in enumerate(days)]
    rows += [row("6E-M1-notadate-1", "long"), row("6E-M1-20251399-2", "short")]  # no date / month 13
    path = write_jsonl(tmp_path / "trades.jsonl", rows[::-1])  # the file is not in time order
    time = TimeSplit("time", "id", r"-(\d{8})-", "%Y%m%d", label_horizon="1d")
    s = build_splits(str(path), None, LABELS, val_split=0.25, time=time)
    assert s.report["train_file"]["dropped_by_reason"] == {"invalid_time": 2}
    t = s.report["time_split"]
    assert t["val"] == {"rows": 2, "first": "2025-11-24T00:00:00Z", "last": "2025-11-25T00:00:00Z"}
    # The val block starts on the 24th (its second row is the 24th too); a one-day horizon purges the 23rd and
    # the other row of the 24th (a tie sits in train by file order, and overlaps val).
    assert t["purged"] == 2 and t["train"]["last"] == "2025-11-22T00:00:00Z"
    assert [str(r.id)[6:14] for r in s.train_original] == ["20251120", "20251121", "20251121", "20251122"]
    by_feature = [row(f"x{i}", "long", x=1, day=d) for i, d in enumerate(["2025-01-02", None, "2025-01-01T12:00"])]
    p2 = write_jsonl(tmp_path / "f.jsonl", [*by_feature, row("x9", "short", x=2)])
    s2 = build_splits(str(p2), None, LABELS, val_split=0.4, allow_null=True, time=TimeSplit("time", "day"))
    assert s2.report["train_file"]["dropped_by_reason"] == {"missing_time": 2}
    assert [r.id for r in s2.train_original] == ["x2"] and [r.id for r in s2.val] == ["x0"]


def test_walk_forward_trains_on_the_past_blocks_and_rolls_with_max_train(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [row(i, LABELS[i % 3], t=100 + i) for i in range(20)])
    wf = TimeSplit("walk_forward", "t", label_horizon=1, folds=4, fold=2)
    s = build_splits(str(path), None, LABELS, time=wf)
    assert [r.id for r in s.val] == list(range(10, 15))
    assert [r.id for r in s.train_original] == list(range(9))  # blocks 0 and 1, less row 9 (purged)
    assert s.report["val_from_train"]["unused_later_rows"] == 5
    rolled = build_splits(
        str(path), None, LABELS, time=TimeSplit("walk_forward", "t", label_horizon=1, folds=4, fold=2, max_train=4)
    )
    assert [r.id for r in rolled.train_original] == [5, 6, 7, 8]
    assert rolled.report["time_split"]["dropped_by_max_train"] == 5


def test_train_and_val_files_that_overlap_in_time_warn(tmp_path, caplog):
    train = write_jsonl(tmp_path / "train.jsonl", [row(i, LABELS[i % 3], t=i) for i in range(10)])
    val = write_jsonl(tmp_path / "val.jsonl", [row(100 + i, LABELS[i % 3], t=8 + i) for i in range(5)])
    with caplog.at_level(logging.WARNING):
        s = build_splits(str(train), str(val), LABELS, time=TimeSplit("random", "t"))
    assert "overlap in time: 2 train rows" in caplog.text
    assert s.report["time_split"]["overlap"] == {"train_rows_at_or_after_val_start": 2, "val_first": 8.0}
    purged = build_splits(str(train), str(val), LABELS, time=TimeSplit("time", "t"))
    assert purged.report["time_split"]["purged"] == 2 and len(purged.train_original) == 8


def test_the_default_split_is_random_and_carves_what_it_always_carved(tmp_path):
    assert shipped_conf().data.split == "random" and shipped_conf().data.time_split() is None
    write_demo(tmp_path, n_train=60, n_val=20)
    s = build_splits(str(tmp_path / "train.jsonl"), None, LABELS, val_split=0.2, seed=42)
    # The ids scikit-learn's stratified draw held out before time splits existed (same seed, same order).
    assert s.report["val_from_train"]["val_ids"] == [
        f"demo-0000{i:02d}" for i in (5, 54, 40, 47, 23, 32, 4, 44, 36, 11, 35, 29)
    ]
    assert "time_split" not in s.report and s.gap is None


def test_blend_folds_are_contiguous_in_time_under_a_time_split():
    rng = np.random.default_rng(0)
    times = rng.permutation(40).astype(float)  # val rows come in the loader's order, not in time order
    y = rng.integers(0, 3, 40)
    held = folds(y, 4, seed=0, order=times)
    assert [sorted(times[h].tolist()) for h in held] == [list(map(float, range(i, i + 10))) for i in (0, 10, 20, 30)]
    assert len({frozenset(h) for h in folds(y, 4, seed=0)} & {frozenset(h) for h in held}) == 0  # random differs
    fit, counts = purged_folds(times, held, Gap(horizon=2, embargo=1))
    assert counts == {"purged": 2 + 4 + 4 + 2, "embargoed": 1 + 1 + 1}
    assert sorted(times[fit[1]].tolist()) == [*map(float, range(8)), *map(float, range(23, 40))]
    logits, base = rng.normal(size=(40, 3)), rng.dirichlet(np.ones(3), 40)
    report, _ = cross_fit(logits, base, y, temperature=1.0, fold_rows=held, fit_rows=fit, calibrate=False)
    assert report["folds"] == 4 and len(report["fold_weights"]) == 4
    assert blocks([3.0, 1.0, 2.0, 1.0], 2)[0].tolist() == [1, 3]  # ties keep file order


def test_walk_forward_report_lines():
    from loralab.reporting.report import _time_lines

    t = {
        "split": "walk_forward",
        "fold": 2,
        "folds": 4,
        "time_key": "id",
        "times": "datetime",
        "train": {"rows": 9, "first": "a", "last": "b"},
        "val": {"rows": 5, "first": "c", "last": "d"},
        "purged": 1,
        "embargoed": 0,
        "dropped_by_max_train": 0,
        "label_horizon": "1d",
        "embargo": 0,
        "purge": True,
    }
    text = "\n".join(_time_lines(t))
    assert "val is block 2 of 4" in text and "| val | 5 | c | d |" in text and "Purged 1 train rows" in text
