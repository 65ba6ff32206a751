"""``loralab-prepare input=<jsonl|csv|parquet> output_dir=<dir>``: stratified, seed-fixed train/val/test files."""

from __future__ import annotations

import sys
from typing import Sequence

from loralab.cli.args import Tool, run
from loralab.data.prepare import PrepareConfig, prepare

DESCRIPTION = (
    "Split one labelled JSONL (or CSV/Parquet table) into train, val and test files of the same format, "
    "deterministic by seed. "
    "Classification records are stratified by label, regression records by score tier (quantile bin "
    "of the mean score); each id lands in exactly one split, repeated ids are dropped and counted. "
    "split_report.json says how many rows each split kept and how far each stratum's share drifted. "
    "split=time cuts train, val and test in time order instead (time_key as the training run's data.time_key) "
    "and purges the rows whose label window (label_horizon) reaches into the next split."
)

TOOL = Tool("loralab-prepare", DESCRIPTION, PrepareConfig)


def report_split(cfg: PrepareConfig) -> None:
    report = prepare(cfg)
    fell_back = " (fell back to unstratified)"
    dropped = report["input"]["dropped_by_reason"]
    print(
        f"{report['input']['rows_kept']} of {report['input']['rows_read']} rows kept"
        + (f" (dropped: {dropped})" if dropped else "")
        + f"; {report['kind']} records, stratified by "
        f"{report['stratified_by']}{'' if report['stratified'] or 'time_split' in report else fell_back}"
    )
    timed = report.get("time_split")
    if timed:
        for split, r in timed["ranges"].items():
            purged = timed["purged"].get(split, 0)
            print(f"  {split:5s} {r['first']} .. {r['last']}" + (f", {purged} purged" if purged else ""))
    for split, s in report["splits"].items():
        shares = ", ".join(f"{k} {v:.1%}" for k, v in s["strata_shares"].items())
        print(f"  {split:5s} {s['rows']:6d} rows ({s['share_of_rows']:.1%})  {shares}")
    print(
        f"largest stratum share drift from the whole file: {report['max_stratum_share_drift']:.2%}; "
        f"files in {cfg.output_dir}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run(TOOL, report_split, argv)


if __name__ == "__main__":
    sys.exit(main())
