"""Split one labelled file into train/val/test, stratified and deterministic by seed (CLI: ``loralab-prepare``).
A JSONL file gives ``train.jsonl``..., a CSV or Parquet table (classification rows) the same format back, every
column and (Parquet) column type kept.

Classification records (``label``) are stratified by label; regression records (``labels``, a list of numbers) by
score tier: the quantile bin of the row's mean score, so every split sees low, middle and high scores alike.
Each id lands in exactly one split (repeated ids are dropped and counted). Rows keep their file order inside a
split. ``split_report.json`` says how many rows each split kept and how far each stratum's share drifted.

``split=time`` cuts the splits in time instead (train, then val, then test: the training run's ``data.split=time``
with ``data.val_file`` set to this val file), ordered as ``data.time_key`` orders them, and purges the rows whose
label window reaches into the next split (train before val, val before test). No embargo: nothing trains on rows
after the val or test block here.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from omegaconf import MISSING

from loralab.data.records import FORMATS, MAX_ROW_BYTES, DataError, LoadReport, RowFormat, label_text, read_rows
from loralab.data.splits import score_tiers, stratified_split
from loralab.data.tables import write_table_subset
from loralab.data.timeorder import (
    NUMBER,
    RECORDS,
    Gap,
    TimeReader,
    in_units,
    is_duration,
    time_order,
    time_text,
    valid_pattern,
)
from loralab.errors import ConfigError
from loralab.fs import atomic_write_json, atomic_write_text, writable_dir

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})  # help is what ``loralab-prepare --help`` shows


@dataclass
class PrepareConfig:
    input: str = _opt(MISSING, "labelled JSONL (classification or regression records), CSV or Parquet")
    output_dir: str = _opt(MISSING, "gets train, val and test files in the input's format, split_report.json")
    format: str = _opt("auto", "auto (by extension: .csv, .parquet/.pq, else JSONL) | jsonl | csv | parquet")
    id_column: str = _opt("id", "CSV/Parquet: the unique-id column")
    label_column: str = _opt("label", "CSV/Parquet: the label column; every other column is a feature")
    train_ratio: float = _opt(0.8, "share of rows for training; the three ratios must sum to 1")
    val_ratio: float = _opt(0.1, "share for validation (early stopping, calibration); must be > 0")
    test_ratio: float = _opt(0.1, "share held out for the final report; 0 writes an empty test.jsonl")
    seed: int = _opt(42, "same seed + same file = same splits")
    score_tiers: int = _opt(3, "regression only: quantile tiers of the mean score used as strata")
    max_row_bytes: int = _opt(MAX_ROW_BYTES, "longer lines are dropped unread (row_too_large), as in training")
    split: str = _opt("random", "random (stratified by seed) | time (train, val, test in time order, purged)")
    time_key: str | None = _opt(None, "split=time: null = file order | id | a feature name (as data.time_key)")
    time_pattern: str | None = _opt(None, "regex whose group in time_key's text is the time, e.g. '-(\\d{8})-'")
    time_format: str | None = _opt(None, "strptime format of that text, e.g. %Y%m%d; null: a number or ISO 8601")
    label_horizon: str = _opt("0", "how far a label looks ahead: records, the feature's units, days or 4h, 2d")
    purge: bool = _opt(True, "drop rows whose label window reaches into the next split")


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def record_kind(row: dict) -> str | None:
    """``classification``, ``regression`` or None (no usable label)."""
    if isinstance(row.get("labels"), list) and row["labels"] and all(_finite_number(v) for v in row["labels"]):
        return "regression"
    label = label_text(row.get("label"))
    if isinstance(label, str) and label:
        return "classification"
    return None


def read_labelled(
    path: str | Path, fmt: RowFormat = RowFormat(), max_row_bytes: int = MAX_ROW_BYTES, time: TimeReader | None = None
) -> tuple[list[Any], list[dict], str, LoadReport]:
    """Row sources (line texts, CSV cells, Parquet row indices: written out verbatim) and parsed rows of one kind
    (the first valid row decides), with every dropped row counted by ``read_rows``, the reader training uses.
    ``time``: rows whose time it cannot read are dropped too (``missing_time``, ``invalid_time``), and each kept
    row holds its time under ``TIME``."""
    kind = None

    def parse(row: dict) -> dict | str:
        nonlocal kind
        row_kind = record_kind(row)
        if row_kind is None:
            return "missing_label"
        kind = kind or row_kind
        if row_kind != kind:
            return f"not_{kind}_record"
        if time is None:
            return row
        t = time(row["id"], row.get("features") or {})
        return t if isinstance(t, str) else {**row, TIME: t}

    pairs, report = read_rows(path, parse, with_text=True, fmt=fmt, max_row_bytes=max_row_bytes)
    if not pairs:
        raise DataError(f"{path}: no usable labelled rows ({dict(report.dropped)})")
    lines, rows = (list(x) for x in zip(*pairs))
    return lines, rows, kind, report


TIME = "__time__"  # a parsed row's time under split=time (never written: the files copy the rows' sources)


def check_time(cfg: PrepareConfig) -> None:
    """The time options, one line each (before any file is read)."""
    if cfg.split not in ("random", "time"):
        raise ConfigError(f"split={cfg.split!r}: must be random or time")
    if cfg.time_key is None and (cfg.time_pattern or cfg.time_format):
        raise ConfigError("time_pattern/time_format read time_key: set it too")
    if cfg.time_pattern is not None and not valid_pattern(cfg.time_pattern):
        raise ConfigError(f"time_pattern={cfg.time_pattern!r}: must be a regular expression with at most one group")
    if cfg.time_format is not None and "%" not in cfg.time_format:
        raise ConfigError(f"time_format={cfg.time_format!r}: must be a strptime format such as %Y%m%d")
    if not is_duration(horizon(cfg)):
        raise ConfigError(f"label_horizon={cfg.label_horizon!r}: must be a number >= 0 or a duration such as 4h, 2d")


def horizon(cfg: PrepareConfig) -> float | str:
    try:
        return float(cfg.label_horizon)
    except ValueError:
        return cfg.label_horizon


def time_split(
    rows: Sequence[dict], ratios: dict[str, float], kind: str, cfg: PrepareConfig
) -> tuple[dict[str, list[int]], dict[str, Any]]:
    """Row indices per split in time order (each list in file order), the rows whose label window reaches the
    next split purged, and the report: each split's time range and how many rows were purged from it."""
    times = np.array([r[TIME] for r in rows] if cfg.time_key else np.arange(len(rows)), dtype=np.float64)
    order = time_order(times)
    n = len(rows)
    n_test, n_val = round(ratios["test"] * n), round(ratios["val"] * n)
    cuts = {"train": order[: n - n_val - n_test], "val": order[n - n_val - n_test : n - n_test]}
    cuts["test"] = order[n - n_test :]
    gap = Gap(in_units(horizon(cfg), kind, "label_horizon"), 0.0, cfg.purge)
    purged = {}
    for split, after in (("train", "val"), ("val", "test")):
        kept, cut, _ = gap.cut(times[cuts[split]], times[cuts[after]])
        purged[split] = int(cut.sum())
        cuts[split] = cuts[split][kept]
    parts = {split: sorted(idx.tolist()) for split, idx in cuts.items()}
    ranges = {
        split: {"first": time_text(times[idx].min(), kind), "last": time_text(times[idx].max(), kind)}
        if len(idx)
        else {"first": None, "last": None}
        for split, idx in cuts.items()
    }
    report = {"time_key": cfg.time_key, "times": kind, "label_horizon": cfg.label_horizon, "purge": cfg.purge}
    return parts, {**report, "ranges": ranges, "purged": purged}


def strata(rows: Sequence[dict], kind: str, n_tiers: int) -> tuple[list[str], list[float] | None]:
    if kind == "classification":
        return [r["label"] for r in rows], None
    return score_tiers([float(np.mean(r["labels"])) for r in rows], n_tiers)


def split_report(strat: Sequence[str], parts: dict[str, list[int]]) -> dict[str, Any]:
    """Rows and stratum shares per split next to the whole file's shares, and the largest drift."""
    total = len(strat)
    overall = Counter(strat)
    names = sorted(overall)
    report: dict[str, Any] = {"overall": {s: overall[s] / total for s in names}, "splits": {}}
    drift = 0.0
    for split, rows in parts.items():
        counts = Counter(strat[i] for i in rows)
        shares = {s: counts[s] / len(rows) if rows else 0.0 for s in names}
        if rows:
            drift = max(drift, *(abs(shares[s] - report["overall"][s]) for s in names))
        report["splits"][split] = {
            "rows": len(rows),
            "share_of_rows": len(rows) / total,
            "strata_counts": {s: counts[s] for s in names},
            "strata_shares": shares,
        }
    report["max_stratum_share_drift"] = drift
    return report


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Write the three split files and ``split_report.json``; returns the report."""
    ratios = {"train": cfg.train_ratio, "val": cfg.val_ratio, "test": cfg.test_ratio}
    if any(r < 0 for r in ratios.values()) or cfg.train_ratio <= 0 or cfg.val_ratio <= 0:
        raise ConfigError(f"ratios={ratios}: train_ratio and val_ratio must be > 0, test_ratio >= 0")
    if not math.isclose(sum(ratios.values()), 1.0, abs_tol=1e-6):
        raise ConfigError(f"ratios={ratios}: must sum to 1 (they sum to {sum(ratios.values()):g})")
    if cfg.format not in ("auto", *FORMATS):
        raise ConfigError(f"format={cfg.format!r}: must be auto, {', '.join(FORMATS)}")
    if cfg.max_row_bytes <= 0:
        raise ConfigError(f"max_row_bytes={cfg.max_row_bytes}: must be > 0")
    check_time(cfg)
    fmt = RowFormat(cfg.format, cfg.id_column, cfg.label_column)
    out = writable_dir(cfg.output_dir, "output_dir")
    reader = (
        TimeReader(cfg.time_key, cfg.time_pattern, cfg.time_format) if cfg.split == "time" and cfg.time_key else None
    )
    lines, rows, kind, load = read_labelled(cfg.input, fmt, cfg.max_row_bytes, reader)
    strat, edges = strata(rows, kind, cfg.score_tiers)
    timed: dict[str, Any] = {}
    if cfg.split == "time":
        parts, timed = time_split(rows, ratios, (reader.kind or NUMBER) if reader else RECORDS, cfg)
        stratified = False
    else:
        parts, stratified = stratified_split(strat, ratios, cfg.seed)
    kind_of_file = fmt.resolve(cfg.input)
    for split in SPLITS:
        chosen = [lines[i] for i in parts.get(split, [])]
        if kind_of_file == "jsonl":
            atomic_write_text(out / f"{split}.jsonl", "".join(line + "\n" for line in chosen))
        else:
            write_table_subset(Path(cfg.input), kind_of_file, chosen, out / f"{split}.{kind_of_file}")
    report = {
        "input": load.as_dict(),
        "kind": kind,
        "stratified_by": "time (not stratified)"
        if timed
        else "label"
        if kind == "classification"
        else f"score tier ({cfg.score_tiers} quantile bins of the mean score)",
        "tier_edges": edges,
        "stratified": stratified,
        "seed": cfg.seed,
        "ratios_requested": ratios,
        **split_report(strat, parts),
        **({"time_split": timed} if timed else {}),
    }
    atomic_write_json(out / "split_report.json", report)
    return report
