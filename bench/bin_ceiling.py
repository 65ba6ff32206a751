"""What binning the numbers costs before any model sees them: HGB on the raw features against HGB on each number's
bin index (``serialize=bins`` with ``cuts: quantile`` and ``cuts: tree``), same train/val split, val macro-F1.

    python bench/tabular_sets.py /tmp/q/sets
    python bench/bin_ceiling.py /tmp/q/sets mixed demo wine breast_cancer iris

Categories are ordinal-coded and booleans 0/1 in every column set, so only the numbers differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import f1_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from loralab.data.records import Record, load_records  # noqa: E402
from loralab.data.serialize import UNKNOWN, Bins  # noqa: E402
from tabular_sets import LABELS  # noqa: E402


def matrix(rows: list[Record], keys: list[str], codes: dict[str, dict[str, int]], bins: Bins | None) -> np.ndarray:
    """Rows x features: numbers raw (``bins`` None) or as their bin index, categories as codes, missing NaN."""
    x = np.full((len(rows), len(keys)), np.nan)
    for i, r in enumerate(rows):
        for j, k in enumerate(keys):
            v = r.features.get(k)
            if v is None:
                continue
            if isinstance(v, bool):
                x[i, j] = float(v)
            elif not isinstance(v, (int, float)):
                x[i, j] = codes.setdefault(k, {}).setdefault(str(v), len(codes.get(k, {})))
            elif bins is None:
                x[i, j] = v
            elif (b := bins.value(k, v)) != UNKNOWN:
                x[i, j] = float(b)
    return x


def main() -> None:
    sets, names = Path(sys.argv[1]), sys.argv[2:]
    for name in names:
        train, val = (load_records(sets / name / f"{split}.jsonl", LABELS[name], allow_null=True)[0] for split in ("train", "val"))
        keys = sorted({k for r in train for k in r.features})
        y_train, y_val = [r.label for r in train], [r.label for r in val]
        scores = {}
        for form, bins in (("raw", None), ("quantile", Bins(cuts="quantile").fit(train)),
                           ("tree", Bins(cuts="tree").fit(train))):
            codes: dict[str, dict[str, int]] = {}
            x_train, x_val = matrix(train, keys, codes, bins), matrix(val, keys, codes, bins)
            model = HistGradientBoostingClassifier(class_weight="balanced", random_state=0).fit(x_train, y_train)
            scores[form] = round(f1_score(y_val, model.predict(x_val), average="macro"), 3)
        print(name, scores, flush=True)


if __name__ == "__main__":
    main()
