"""Split one labelled JSONL into train/val/test, stratified and deterministic by seed.

    python -m loralab.data.prepare input=labeled.jsonl output_dir=data/split train_ratio=0.8 val_ratio=0.1 test_ratio=0.1

Classification records (``label``) are stratified by label; regression records (``labels``, a list of numbers) by
score tier: the quantile bin of the row's mean score, so every split sees low, middle and high scores alike.
Each id lands in exactly one split (repeated ids are dropped and counted). Rows keep their file order inside a
split. ``split_report.json`` says how many rows each split kept and how far each stratum's share drifted.
"""

from __future__ import annotations

import logging
import math
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from loralab.data.records import DataError, LoadReport, read_rows
from loralab.data.splits import score_tiers, stratified_split
from loralab.fs import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass
class PrepareConfig:
    input: str = MISSING         # labelled JSONL (classification or regression records)
    output_dir: str = MISSING    # gets train.jsonl, val.jsonl, test.jsonl, split_report.json
    train_ratio: float = 0.8
    val_ratio: float = 0.1
    test_ratio: float = 0.1      # 0 writes an empty test.jsonl
    seed: int = 42               # same seed + same file = same splits
    score_tiers: int = 3         # regression only: quantile tiers of the mean score used as strata


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def record_kind(row: dict) -> str | None:
    """``classification``, ``regression`` or None (no usable label)."""
    if isinstance(row.get("labels"), list) and row["labels"] and all(_finite_number(v) for v in row["labels"]):
        return "regression"
    if isinstance(row.get("label"), str) and row["label"]:
        return "classification"
    return None


def read_labelled(path: str | Path) -> tuple[list[str], list[dict], str, LoadReport]:
    """Line texts (written out verbatim) and parsed rows of one kind (the first valid row decides), with every
    dropped line counted by ``read_rows``, the reader training uses."""
    kind = None

    def parse(row: dict) -> dict | str:
        nonlocal kind
        row_kind = record_kind(row)
        if row_kind is None:
            return "missing_label"
        kind = kind or row_kind
        return row if row_kind == kind else f"not_{kind}_record"

    pairs, report = read_rows(path, parse, with_text=True)
    if not pairs:
        raise DataError(f"{path}: no usable labelled rows ({dict(report.dropped)})")
    lines, rows = (list(x) for x in zip(*pairs))
    return lines, rows, kind, report


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
        report["splits"][split] = {"rows": len(rows), "share_of_rows": len(rows) / total,
                                   "strata_counts": {s: counts[s] for s in names}, "strata_shares": shares}
    report["max_stratum_share_drift"] = drift
    return report


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    ratios = {"train": cfg.train_ratio, "val": cfg.val_ratio, "test": cfg.test_ratio}
    if any(r < 0 for r in ratios.values()) or cfg.train_ratio <= 0 or cfg.val_ratio <= 0:
        raise ValueError(f"ratios={ratios}: train_ratio and val_ratio must be > 0, test_ratio >= 0")
    if not math.isclose(sum(ratios.values()), 1.0, abs_tol=1e-6):
        raise ValueError(f"ratios={ratios}: must sum to 1 (they sum to {sum(ratios.values()):g})")
    lines, rows, kind, load = read_labelled(cfg.input)
    strat, edges = strata(rows, kind, cfg.score_tiers)
    parts, stratified = stratified_split(strat, ratios, cfg.seed)
    out = Path(cfg.output_dir)
    for split in SPLITS:
        atomic_write_text(out / f"{split}.jsonl", "".join(lines[i] + "\n" for i in parts.get(split, [])))
    report = {"input": load.as_dict(), "kind": kind, "stratified_by": "label" if kind == "classification"
              else f"score tier ({cfg.score_tiers} quantile bins of the mean score)", "tier_edges": edges,
              "stratified": stratified, "seed": cfg.seed, "ratios_requested": ratios,
              **split_report(strat, parts)}
    atomic_write_json(out / "split_report.json", report)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(PrepareConfig), OmegaConf.from_cli(list(argv or sys.argv[1:])))
        report = prepare(OmegaConf.to_object(cfg))
    except (DataError, ValueError, OmegaConfBaseException) as err:
        log.error("%s", err)
        return 2
    dropped = report["input"]["dropped_by_reason"]
    print(f"{report['input']['rows_kept']} of {report['input']['rows_read']} rows kept"
          + (f" (dropped: {dropped})" if dropped else "") + f"; {report['kind']} records, stratified by "
          f"{report['stratified_by']}{'' if report['stratified'] else ' (fell back to unstratified)'}")
    for split, s in report["splits"].items():
        shares = ", ".join(f"{k} {v:.1%}" for k, v in s["strata_shares"].items())
        print(f"  {split:5s} {s['rows']:6d} rows ({s['share_of_rows']:.1%})  {shares}")
    print(f"largest stratum share drift from the whole file: {report['max_stratum_share_drift']:.2%}; "
          f"files in {cfg.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
