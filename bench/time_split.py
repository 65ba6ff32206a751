"""Random vs time-ordered validation on a time-ordered variant of the demo data (docs/evaluation.md).

    python bench/time_split.py [OUT_DIR] [--rows 3000] [--seeds 0 1 2]

The demo records carry no time, so this writes a variant: the same features, trade ids that carry a trading day
(``6E-M1-YYYYMMDD-n``, 12 trades a day from 2024-01-02), and a label rule that drifts: a setup is a trade only
when its wave strength clears a threshold that climbs from 0.35 to 0.75 over the period, while volatility
(``atr``) rises with time, as regimes do. A stationary control (the demo's own rule) is scored alike. Each file is
split by loralab's own splitter (``data.split=random`` | ``time`` | ``walk_forward``) and scored with the in-run
HGB baseline, which takes seconds; the LoRA model sees the same splits (the training command is printed).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from datetime import date, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from loralab.baseline import fit_baseline  # noqa: E402
from loralab.data.demo import make_rows  # noqa: E402
from loralab.data.records import write_rows  # noqa: E402
from loralab.data.splits import TimeSplit, build_splits  # noqa: E402

LABELS = ["long", "short", "skip"]
PER_DAY = 12
ID_TIME = {"time_key": "id", "time_pattern": r"-(\d{8})-", "time_format": "%Y%m%d"}


def trading_day(i: int) -> str:
    return (date(2024, 1, 2) + timedelta(days=i // PER_DAY)).strftime("%Y%m%d")


def variant(n: int, seed: int, drift: bool) -> list[dict]:
    """Demo rows in time order with dated ids; ``drift``: the moving wave threshold and the rising volatility."""
    rng = random.Random(seed + 1)
    rows = make_rows(n, seed, noise=0.0)
    for i, r in enumerate(rows):
        f = r["features"]
        r["id"] = f"6E-M1-{trading_day(i)}-{10000 + i}"
        if drift:
            share = i / n
            f["atr"] = round(f["atr"] * (1 + 1.5 * share), 3)
            setup = f["ext_dir"] == f["int_dir"] and f["choch_bull" if f["ext_dir"] == 1 else "choch_bear"]
            trade = setup and f["wave_strength"] > 0.35 + 0.4 * share
            r["label"] = ("long" if f["ext_dir"] == 1 else "short") if trade else "skip"
        if rng.random() < 0.08:  # the demo's label noise
            r["label"] = rng.choice(LABELS)
    return rows


def score(path: Path, time: TimeSplit | None, seed: int) -> float:
    s = build_splits(str(path), None, LABELS, val_split=0.2, seed=seed, time=time)
    return fit_baseline("hgb", s.train_original, s.val, LABELS, seed, {}, 1)["scalars"]["val_macro_f1"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", default="data/demo/time")
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--folds", type=int, default=5)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for drift in (True, False):
        name = "trades" if drift else "trades_stationary"
        results: dict[str, list[float]] = {"random": [], "time": [], "walk_forward mean": [], "walk_forward worst": []}
        for seed in args.seeds:
            path = write_rows(out / f"{name}_seed{seed}.jsonl", variant(args.rows, seed, drift))
            results["random"].append(score(path, None, seed))
            results["time"].append(score(path, TimeSplit("time", label_horizon=1, **ID_TIME), seed))
            wf = [
                score(path, TimeSplit("walk_forward", label_horizon=1, folds=args.folds, fold=k, **ID_TIME), seed)
                for k in range(1, args.folds)
            ]
            results["walk_forward mean"].append(statistics.mean(wf))
            results["walk_forward worst"].append(min(wf))
        print(
            json.dumps(
                {
                    "file": f"{name} ({args.rows} rows, {'drifting' if drift else 'stationary'} rule)",
                    "hgb val_macro_f1, mean over seeds": {k: round(statistics.mean(v), 4) for k, v in results.items()},
                    "per seed": {k: [round(x, 4) for x in v] for k, v in results.items()},
                }
            )
        )
    print(
        f"train the model on the same split: python train.py data=jsonl data.train_file={out}/trades_seed0.jsonl "
        f"data.split=time data.time_key=id 'data.time_pattern=\"-(\\d{{8}})-\"' data.time_format=%Y%m%d "
        f"data.label_horizon=1"
    )


if __name__ == "__main__":
    main()
