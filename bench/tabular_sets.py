"""Data sets of each kind the defaults must hold on, built at bench/test time (never committed): JSONL records
``{"id", "features", "label"}`` with a train and a val file.

- ``wine`` (178 rows, 13 continuous features, 3 classes) and ``breast_cancer`` (569 rows, 30 continuous features,
  2 classes) and ``iris`` (150, 4, 3): real tabular sets bundled with scikit-learn (offline), custom label names.
- ``mixed``: a few thousand synthetic rows, numeric and categorical features, a ~13% minority class decided by a
  rule over several features plus label noise.
- ``demo``: the project's own demo records (``loralab.data.demo``).

    python bench/tabular_sets.py OUT_DIR [NAME ...]     # writes OUT_DIR/NAME/{train,val}.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
from sklearn import datasets
from sklearn.model_selection import train_test_split

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from loralab.data.demo import write_demo  # noqa: E402
from loralab.data.records import write_rows  # noqa: E402

LABELS = {
    "wine": ["cultivar_a", "cultivar_b", "cultivar_c"],
    "breast_cancer": ["malignant", "benign"],
    "iris": ["setosa", "versicolor", "virginica"],
    "mixed": ["enter", "exit", "hold"],
    "demo": ["long", "short", "skip"],
}
VAL_SHARE = 0.3  # 124 of 178 wine rows and 398 of 569 breast-cancer rows in train


def feature_name(name: str) -> str:
    return "_".join(name.replace("(", " ").replace(")", " ").replace("/", " ").split()).lower()


def sklearn_rows(loader: Callable, labels: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    bunch = loader()
    names = [feature_name(n) for n in bunch.feature_names]
    rows = [
        {"id": f"r{i:05d}", "features": {n: round(float(v), 6) for n, v in zip(names, x)}, "label": labels[int(y)]}
        for i, (x, y) in enumerate(zip(bunch.data, bunch.target))
    ]
    return rows, [r["label"] for r in rows]


def mixed_rows(n: int = 4300, seed: int = 0) -> tuple[list[dict[str, Any]], list[str]]:
    """A rule over mixed features: ``enter`` (~13%) needs a strong trend in an open market with enough volume;
    ``exit`` when the trend turned against a held position; the rest ``hold``; 5% label noise."""
    rng = np.random.default_rng(seed)
    regimes, venues = ["calm", "trending", "volatile", "illiquid"], ["xnas", "xnys", "bats", "arca", "iex"]
    rows, labels = [], []
    for i in range(n):
        f = {
            "trend": round(float(rng.normal(0, 1)), 3),
            "volume_z": round(float(rng.normal(0, 1)), 3),
            "spread_bps": round(float(rng.lognormal(1.0, 0.6)), 2),
            "rsi": round(float(rng.uniform(5, 95)), 1),
            "days_held": int(rng.integers(0, 30)),
            "position": bool(rng.random() < 0.4),
            "regime": str(rng.choice(regimes, p=[0.35, 0.3, 0.25, 0.1])),
            "venue": str(rng.choice(venues)),
            "gap_pct": round(float(rng.normal(0, 2)), 2),
            "hour": int(rng.integers(9, 17)),
        }
        if f["trend"] > 0.5 and f["volume_z"] > -0.5 and f["regime"] != "illiquid" and not f["position"]:
            label = "enter"
        elif f["position"] and (f["trend"] < -0.3 or f["rsi"] > 80):
            label = "exit"
        else:
            label = "hold"
        if rng.random() < 0.05:
            label = str(rng.choice(LABELS["mixed"]))
        rows.append({"id": f"m{i:05d}", "features": f, "label": label})
        labels.append(label)
    return rows, labels


def write_set(name: str, out_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    out = Path(out_dir) / name
    if name == "demo":
        return write_demo(out)
    if name == "mixed":
        rows, strata = mixed_rows(seed=seed)
    else:
        loader = {"wine": datasets.load_wine, "breast_cancer": datasets.load_breast_cancer, "iris": datasets.load_iris}[
            name
        ]
        rows, strata = sklearn_rows(loader, LABELS[name])
    train, val = train_test_split(rows, test_size=VAL_SHARE, random_state=seed, stratify=strata)
    return write_rows(out / "train.jsonl", train), write_rows(out / "val.jsonl", val)


def describe(path: Path) -> dict[str, Any]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    labels = [r["label"] for r in rows]
    return {
        "rows": len(rows),
        "features": len(rows[0]["features"]),
        "classes": {c: labels.count(c) for c in sorted(set(labels))},
    }


if __name__ == "__main__":
    out_dir, names = Path(sys.argv[1]), sys.argv[2:] or list(LABELS)
    for name in names:
        train, val = write_set(name, out_dir)
        print(name, train, describe(train), val, describe(val))
