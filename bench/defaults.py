"""The defaults against the in-run HGB baseline on every kind of data set: one full run (the same path as
``python train.py``) per (set, variant), where a variant is a name and the Hydra overrides that differ from the
shipped defaults (none: the defaults themselves). Each result is appended as a JSON line with the model's and the
baseline's val macro-F1, the gap, epochs, wall time and its stages, so variants can run in separate processes and
the table is printed at the end.

    python bench/defaults.py --sets trading trading_rare --variant defaults
    python bench/defaults.py --sets trading --variant balanced data.oversample_to=balanced
    python bench/defaults.py --table                      # every result so far, one row per (set, variant)
    python bench/defaults.py --collect RUN_DIR --sets trading --variant before   # a run made elsewhere

Sets are built by ``bench/tabular_sets.py`` into ``--data`` (never committed); results go to ``--out`` (default
``bench/results/defaults.jsonl``, git-ignored); run dirs and the MLflow store to ``--work``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from serialize import append, collect, run_one  # noqa: E402
from tabular_sets import LABELS  # noqa: E402


def stage_seconds(run_dir: Path, store: Path) -> dict[str, float]:
    """The run's ``time.<stage>_s`` metrics from its MLflow store (empty for a store without them)."""
    import mlflow

    run_id = (run_dir / ".mlflow_run_id").read_text().strip()
    metrics = mlflow.MlflowClient(f"sqlite:///{store}").get_run(run_id).data.metrics
    return {k[5:-2]: v for k, v in metrics.items() if k.startswith("time.") and k.endswith("_s")}


def result(run_dir: Path, store: Path, name: str, variant: str, overrides: list[str]) -> dict:
    out = collect(run_dir, name, "bins", overrides)
    out["variant"] = variant
    data = json.loads((run_dir / "data_report.json").read_text())
    out["duplication"] = data.get("oversampling", {}).get("duplication")
    out["stage_seconds"] = stage_seconds(run_dir, store) if store.is_file() else {}
    out["peak_rss_mb"] = peak_rss_mb()
    out["machine"] = machine()
    return out


def machine() -> dict[str, object]:
    """What decides a run's float rounding besides the code: the CPU kernels torch picks and its thread count. Runs
    of one seed repeat exactly on one machine, not across machines that differ here."""
    import platform

    import torch

    return {
        "arch": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def table(results: list[dict]) -> str:
    lines = [
        "| set | train rows | variant | val macro-F1 | HGB | gap | best / run epochs (steps) | minority seen "
        "| wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r["set"], r["variant"])):
        dup = r.get("duplication")
        lines.append(
            f"| {r['set']} | {r['train_rows']} | {r['variant']} | {r['val_macro_f1']:.3f} | {r['hgb_macro_f1']:.3f} | "
            f"{r['gap']:+.3f} | {r['best_epoch']} / {r['epochs_run']} ({r['optimizer_steps']}) | "
            f"{f'{dup:.1f}x' if dup else '-'} | {r['wall_time_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", nargs="*", default=["trading", "trading_rare", "demo"], choices=list(LABELS))
    p.add_argument("--variant", default="defaults", help="the name of these overrides in the table")
    p.add_argument("--data", type=Path, default=Path("/tmp/loralab-bench/sets"))
    p.add_argument("--work", type=Path, default=Path("/tmp/loralab-bench/runs"))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "defaults.jsonl")
    p.add_argument("--table", action="store_true", help="print the table of --out and exit")
    p.add_argument("--collect", type=Path, help="add the result of this finished run dir (one --sets)")
    overrides = [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]
    args = p.parse_args([a for a in sys.argv[1:] if a not in overrides])
    args.out = args.out.resolve()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs = []
    if args.collect:
        runs = [result(args.collect, args.work / "mlflow.db", args.sets[0], args.variant, overrides)]
    elif not args.table:
        args.work.mkdir(parents=True, exist_ok=True)
        os.chdir(args.work)  # the SQLite store puts artifacts under ./mlruns: here, never in the checkout
        for name in args.sets:
            run_dir = Path(run_one(name, "bins", args.data, args.work, overrides)["run_dir"])
            runs.append(result(run_dir, args.work / "mlflow.db", name, args.variant, overrides))
    for r in runs:
        append(args.out, r)
    results = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out.is_file() else []
    print(table(results))


if __name__ == "__main__":
    main()
