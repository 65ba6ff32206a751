"""``loralab-evaluate model=<zip or dir> input=<test.jsonl|csv|parquet>``: metrics of an exported model on a
labelled file."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

from loralab.cli.args import Tool, option, run
from loralab.cli.predict import ExportedModelArgs

DESCRIPTION = (
    "Evaluate an exported model on a labelled JSONL, CSV or Parquet file and write a metrics report "
    "shaped like training's "
    "metrics.json: macro-F1, accuracy, per-class table, confusion matrix, NLL/ECE/Brier raw and at the "
    "exported temperature, and the training gates applied to this file's metrics."
)


@dataclass
class EvaluateArgs(ExportedModelArgs):
    input: str = option(help='labelled JSONL ({"id", "features", "label"} rows), or CSV/Parquet with a label column')
    output: str | None = option(None, "metrics JSON; null writes <input without its suffix>.metrics.json")
    prefix: str = option("test_", "metric key prefix (training uses val_)")


TOOL = Tool("loralab-evaluate", DESCRIPTION, EvaluateArgs)


def evaluate(args: EvaluateArgs) -> None:
    from loralab.inference import evaluate_file  # torch and transformers load only when there is work to do

    m = evaluate_file(
        args.model,
        args.input,
        args.output,
        args.prefix,
        args.batch_size,
        args.device,
        args.trust_remote_code,
        args.columns,
        args.max_row_bytes,
    )
    p = args.prefix
    print(
        f"{m['input']['rows_kept']} rows ({m['input']['rows_dropped']} dropped): macro-F1 {m[p + 'macro_f1']:.4f}, "
        f"accuracy {m[p + 'accuracy']:.4f}, NLL {m[p + 'nll']:.4f} -> {m[p + 'nll_calibrated']:.4f} at "
        f"T={m['temperature']:.3f}; ECE {m[p + 'ece']:.4f} -> {m[p + 'ece_calibrated']:.4f} -> {m['output']}"
    )
    if e := m.get("ensemble"):  # what predict serves for this export: the model blended with its baseline
        print(
            f"served blend (model weight {e['weight']:g}): macro-F1 {e[p + 'macro_f1']:.4f}, accuracy "
            f"{e[p + 'accuracy']:.4f}, log-loss {e[p + 'log_loss']:.4f}"
        )
    if d := m.get("decision"):  # what predict answers for this export: the thresholded decisions
        acting = ", ".join(
            f"{label} precision {d.get(p + 'precision_' + label, float('nan')):.4f} coverage "
            f"{d[p + 'coverage_' + label]:.4f}"
            for label in d["thresholds"]
        )
        verdicts = [g["passed"] for g in d["gates"].values()]
        argmax = [g["passed"] for g in d["argmax"]["gates"].values()]
        print(
            f"decisions ({acting}; abstained {d['abstained']}, fallback {d['fallback']}): gates "
            f"{verdicts.count(True)}/{len(verdicts)} pass (argmax {argmax.count(True)}/{len(argmax)})"
        )


def main(argv: Sequence[str] | None = None) -> int:
    return run(TOOL, evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
