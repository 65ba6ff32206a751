"""Re-run the ``ensemble=blend`` cross-fit of finished run dirs with other settings, without training again: the
model's val logits are recovered from ``ensemble_val.jsonl`` (T·log p_model equals the logits up to a per-row
constant, which softmax ignores) beside the baseline's probabilities and the labels.

    python bench/blend.py RUN_DIR [RUN_DIR ...] [--select macro_f1 log_loss] [--folds 5] [--seed 42]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from loralab.ensemble import cross_fit  # noqa: E402


def reblend(run_dir: Path, select: str, folds: int, seed: int) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "ensemble_val.jsonl").read_text().splitlines()]
    labels = list(rows[0]["model"])
    y = np.array([labels.index(r["label"]) for r in rows])
    model, base = (np.array([[r[who][c] for c in labels] for r in rows]) for who in ("model", "baseline"))
    t = metrics["temperature"]
    report, _ = cross_fit(
        t * np.log(np.clip(model, 1e-300, 1)),
        base,
        y,
        temperature=t,
        k=folds,
        seed=seed,
        select=select,
        calibrate=metrics["calibration"]["method"] != "none",
    )
    oof = {who: round(s["macro_f1"], 4) for who, s in report["oof"].items()}
    return {
        "run_dir": str(run_dir),
        "select": select,
        "folds": report["folds"],
        "oof_macro_f1": oof,
        "weight": report["weight"],
        "fold_weights": report["fold_weights"],
        "target_met": oof["blend"] >= max(oof["model"], oof["baseline"]) - 0.01,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("--select", nargs="*", default=["macro_f1", "log_loss"])
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args()
    for run_dir in args.run_dirs:
        for select in args.select:
            print(json.dumps(reblend(run_dir, select, args.folds, args.seed)))


if __name__ == "__main__":
    main()
