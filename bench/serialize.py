"""Each serialization on each kind of data set, with the run's defaults: tokens/record, train samples/s, val
macro-F1, the in-run HGB baseline's macro-F1 and the gap. One full training run (``lifecycle.run``: the same path
as ``python train.py``) per (set, serializer); each result is appended as a JSON line, so runs can be split across
processes and the table printed at the end.

    python bench/serialize.py --sets wine breast_cancer --serializers json kv bins [hydra overrides ...]
    python bench/serialize.py --table                       # the table of every result so far

Sets are built by ``bench/tabular_sets.py`` into ``--data`` (never committed). Results go to ``--out``
(default ``bench/results/serialize.jsonl``, git-ignored); run dirs and the MLflow store to ``--work``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from hydra import compose, initialize_config_dir  # noqa: E402

from loralab.lifecycle import run as train  # noqa: E402
from loralab.paths import conf_dir  # noqa: E402
from tabular_sets import LABELS, write_set  # noqa: E402


def run_one(name: str, serializer: str, data_dir: Path, work: Path, overrides: list[str]) -> dict:
    train_file, val_file = write_set(name, data_dir)
    run_dir = work / f"{name}-{serializer}-{datetime.now(timezone.utc):%H%M%S}"
    args = ["data=jsonl", f"data.train_file={train_file}", f"data.val_file={val_file}",
            f"data.labels=[{','.join(LABELS[name])}]", f"serialize={serializer}", "data.cache_dir=null",
            f"paths.output_dir={run_dir}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "quiet=true",
            *overrides]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=args)
    train(cfg)
    return collect(run_dir, name, serializer, overrides)


def collect(run_dir: Path, name: str, serializer: str, overrides: list[str]) -> dict:
    """One result line from a finished run dir (also one trained with ``python train.py``)."""
    summary = json.loads((run_dir / "training_summary.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    data = json.loads((run_dir / "data_report.json").read_text())
    base = metrics["baseline"]["scalars"]["val_macro_f1"]
    return {"set": name, "serialize": serializer, "train_rows": data["train_file"]["rows_kept"],
            "tokens_per_record": data["serialization"]["tokens_per_train_record"],
            "train_samples_per_s": summary["train_samples_per_s"], "val_macro_f1": metrics["val_macro_f1"],
            "hgb_macro_f1": base, "gap": metrics["val_macro_f1"] - base, "best_epoch": summary["best_epoch"],
            "epochs_run": summary["epochs_run"], "optimizer_steps": summary["optimizer_steps"],
            "stop_reason": summary["stop_reason"], "wall_time_s": summary["wall_time_s"],
            "overrides": overrides, "run_dir": str(run_dir), "example": data["serialization"]["example"][:160],
            "host": platform.node(), "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def table(results: list[dict]) -> str:
    lines = ["| set | train rows | serialize | tokens/record | train samples/s | val macro-F1 | HGB macro-F1 | gap | "
             "best / run epochs (steps) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['set']} | {r['train_rows']} | {r['serialize']} | "
                     f"{r['tokens_per_record']:.1f} | {r['train_samples_per_s']:.1f} | {r['val_macro_f1']:.3f} | "
                     f"{r['hgb_macro_f1']:.3f} | {r['gap']:+.3f} | {r['best_epoch']} / {r['epochs_run']} "
                     f"({r['optimizer_steps']}) |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", nargs="*", default=["wine", "breast_cancer", "mixed", "demo"], choices=list(LABELS))
    p.add_argument("--serializers", nargs="*", default=["json", "kv", "bins"])
    p.add_argument("--data", type=Path, default=Path("/tmp/loralab-bench/sets"))
    p.add_argument("--work", type=Path, default=Path("/tmp/loralab-bench/runs"))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serialize.jsonl")
    p.add_argument("--table", action="store_true", help="print the table of --out and exit")
    p.add_argument("--collect", type=Path, help="add the result of this finished run dir (one --sets/--serializers)")
    args, overrides = p.parse_known_args()
    if args.collect:
        result = collect(args.collect, args.sets[0], args.serializers[0], overrides)
        with args.out.open("a") as fh:
            fh.write(json.dumps(result) + "\n")
    elif not args.table:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for name in args.sets:
            for serializer in args.serializers:
                result = run_one(name, serializer, args.data, args.work, overrides)
                with args.out.open("a") as fh:
                    fh.write(json.dumps(result) + "\n")
                print(json.dumps(result), flush=True)
    results = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out.is_file() else []
    print(table(results))


if __name__ == "__main__":
    main()
