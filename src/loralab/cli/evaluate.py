"""Metrics report of an exported model on a labelled JSONL, shaped like training's ``metrics.json``.

CLI: ``python -m loralab.cli.evaluate model=<zip or dir> input=<test.jsonl> [output=<metrics.json>] [prefix=test_]``
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from omegaconf import MISSING

from loralab.calibrate import calibration_metrics, probabilities
from loralab.data.records import DataError, load_records
from loralab.metrics import classification_metrics, evaluate_gates
from loralab.inference import load_exported, resolve_device, run_cli, score


def evaluate_file(model: str | Path, input: str | Path, output: str | Path | None = None, prefix: str = "test_",
                  batch_size: int = 64, device: str = "auto", trust_remote_code: bool = False) -> dict[str, Any]:
    """Score a labelled file; write and return scalars (``<prefix>macro_f1``…, NLL/ECE/Brier raw and with the
    exported temperature), per-class table, confusion matrix and the training gates applied to this file."""
    exported = load_exported(model, resolve_device(device), trust_remote_code)
    labels, meta = exported.labels, exported.meta
    records, report = load_records(input, labels=labels, allow_null=meta.get("allow_null", False))
    if not records:
        raise DataError(f"{input}: no valid labelled rows (dropped by reason: {dict(report.dropped)})")
    y = [labels.index(r.label) for r in records]
    logits = score(exported, records, batch_size)
    cls = classification_metrics(y, logits.argmax(-1), labels, prefix=prefix)
    n_bins = meta.get("calibration", {}).get("n_bins", 15)
    raw = calibration_metrics(probabilities(logits), y, n_bins)
    calibrated = calibration_metrics(probabilities(logits, exported.temperature), y, n_bins)
    scalars = {**cls["scalars"], **{f"{prefix}{k}": v for k, v in raw.items()},
               **{f"{prefix}{k}_calibrated": v for k, v in calibrated.items()}}
    # Training's gates are written for val_* keys; the same thresholds apply to this file's keys.
    gates = {prefix + k.removeprefix("val_"): rule for k, rule in meta.get("gates", {}).items()}
    metrics = {"temperature": exported.temperature, **scalars, "per_class": cls["per_class"],
               "confusion_matrix": cls["confusion_matrix"], "gates": evaluate_gates(scalars, gates),
               "input": report.as_dict(), "model_part": exported.part}
    output = Path(output) if output else Path(input).with_suffix(".metrics.json")
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(json.dumps(metrics, indent=2))
    tmp.replace(output)
    return {**metrics, "output": str(output)}


@dataclass
class EvaluateArgs:
    model: str = MISSING  # model_final.zip or a run dir with loralab.json
    input: str = MISSING  # labelled JSONL ({"id", "features", "label"} rows)
    output: str | None = None  # metrics JSON; default <input without .jsonl>.metrics.json
    prefix: str = "test_"  # metric key prefix (training uses val_)
    batch_size: int = 64
    device: str = "auto"
    trust_remote_code: bool = False


def _evaluate(args: EvaluateArgs) -> None:
    m = evaluate_file(args.model, args.input, args.output, args.prefix, args.batch_size, args.device,
                      args.trust_remote_code)
    p = args.prefix
    print(f"{m['input']['rows_kept']} rows ({m['input']['rows_dropped']} dropped): macro-F1 {m[p + 'macro_f1']:.4f}, "
          f"accuracy {m[p + 'accuracy']:.4f}, NLL {m[p + 'nll']:.4f} -> {m[p + 'nll_calibrated']:.4f} at "
          f"T={m['temperature']:.3f}; ECE {m[p + 'ece']:.4f} -> {m[p + 'ece_calibrated']:.4f} -> {m['output']}")


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_evaluate, EvaluateArgs, argv, "python -m loralab.cli.evaluate model=<zip or dir> input=<jsonl>")


if __name__ == "__main__":
    sys.exit(main())
