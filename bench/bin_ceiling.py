"""What binning the numbers costs before any model sees them: the run's own HGB baseline (``baseline.build_estimator``,
class-balanced as ``conf/baseline/hgb.yaml`` sets it) on the raw features against the same baseline on each number's
bin index (``serialize=bins`` with ``cuts: quantile`` and ``cuts: tree``), same train/val split, val macro-F1.

    python bench/tabular_sets.py /tmp/q/sets
    python bench/bin_ceiling.py /tmp/q/sets mixed demo wine breast_cancer iris
    python bench/bin_ceiling.py /tmp/q/sets trading_rare --bins 16       # serialize.n_bins=16
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from sklearn.metrics import f1_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from tabular_sets import LABELS  # noqa: E402

from loralab.baseline import build_estimator, feature_dicts  # noqa: E402
from loralab.data.records import Record, load_records  # noqa: E402
from loralab.data.serialize import Bins, is_number  # noqa: E402


def binned(records: list[Record], bins: Bins) -> list[Record]:
    """Every number replaced by its bin index (an unknown bin by null); booleans and categories as they are."""

    def one(k, v):
        if isinstance(v, bool) or not is_number(v) or k not in bins.features:
            return v
        return bins.bin_index(k, v) if bins.features[k]["type"] == "number" else None  # the model reads "?"

    return [replace(r, features={k: one(k, v) for k, v in r.features.items()}) for r in records]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sets", type=Path)
    p.add_argument("names", nargs="+", choices=list(LABELS))
    p.add_argument("--bins", type=int, default=10, help="serialize.n_bins")
    args = p.parse_args()
    sets, names = args.sets, args.names
    for name in names:
        train, val = (
            load_records(sets / name / f"{split}.jsonl", LABELS[name], allow_null=True)[0] for split in ("train", "val")
        )
        scores = {}
        for form in ("raw", "quantile", "tree"):
            bins = None if form == "raw" else Bins(n_bins=args.bins, cuts=form).fit(train)
            fit_rows, val_rows = (train, val) if bins is None else (binned(train, bins), binned(val, bins))
            model = build_estimator("hgb", 42, {"class_weight": "balanced"})  # the runs' seed
            model.fit(feature_dicts(fit_rows), [r.label for r in fit_rows])
            scores[form] = round(
                f1_score([r.label for r in val_rows], model.predict(feature_dicts(val_rows)), average="macro"), 3
            )
        print(name, scores, flush=True)


if __name__ == "__main__":
    main()
