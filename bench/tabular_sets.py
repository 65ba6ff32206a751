"""Data sets of each kind the defaults must hold on, built at bench/test time (never committed): JSONL records
``{"id", "features", "label"}`` with a train and a val file.

- ``wine`` (178 rows, 13 continuous features, 3 classes) and ``breast_cancer`` (569 rows, 30 continuous features,
  2 classes) and ``iris`` (150, 4, 3): real tabular sets bundled with scikit-learn (offline), custom label names.
- ``mixed``: a few thousand synthetic rows, numeric and categorical features, a ~13% minority class decided by a
  rule over several features plus label noise.
- ``demo``: the project's own demo records (``loralab.data.demo``).
- ``trading`` (3,000 train / 1,000 val), ``trading_rare`` (6,000 / 1,500), ``trading_drift`` (4,000 / 1,000, in time
  order, val the latest), ``trading_4k`` / ``trading_40k`` (4,000 / 40,000 train rows of one stream, the same 1,000
  val): trading events whose ``long`` / ``short`` labels are rare (3-8% each) and come from conjunctions of 4
  conditions over 11 numeric, boolean and categorical features, with 6% label noise.

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
    "trading": ["long", "short", "skip"],
    "trading_rare": ["long", "short", "skip"],
    "trading_drift": ["long", "short", "skip"],
    "trading_4k": ["long", "short", "skip"],
    "trading_40k": ["long", "short", "skip"],
}
# name: (train rows, val rows, |return| a signal needs, whether the rule drifts over time)
TRADING = {
    "trading": (3000, 1000, 0.7, False),
    "trading_rare": (6000, 1500, 1.2, False),
    "trading_drift": (4000, 1000, 0.7, True),
    "trading_4k": (4000, 1000, 0.7, False),
    "trading_40k": (40000, 1000, 0.7, False),
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


def trading_rows(n: int, seed: int, edge: float, drift: bool, start: int = 0) -> list[dict[str, Any]]:
    """Events in time order. ``long``: a strong 5-bar return, rising volume, RSI not overbought, not a volatile
    regime; ``short``: the mirror on the return, a selling order book, outside the Asian session, a tight spread;
    otherwise ``skip``; 6% of labels replaced at random. ``edge`` sets how strong the return must be (0.7: ~7%
    each with the noise, 1.2: ~4.5%). With ``drift`` the volume condition tightens and the volatile regime grows
    over the file, so the latest events (val) follow a rule the earliest only hint at."""
    rng = np.random.default_rng(seed)
    regimes, sessions = ["calm", "trending", "volatile"], ["asia", "london", "new_york"]
    rows = []
    for i in range(n):
        t = (start + i) / 5000 if drift else 0.0  # 0 -> 1 over a drift set's 5,000 events
        f = {
            "ret_5": round(float(rng.normal(0, 1)), 3),
            "ret_20": round(float(rng.normal(0, 1)), 3),
            "volume_z": round(float(rng.normal(0, 1)), 3),
            "rsi": round(float(rng.uniform(5, 95)), 1),
            "spread_bps": round(float(rng.lognormal(1.0, 0.6)), 2),
            "atr_pct": round(float(rng.lognormal(-0.5, 0.4)), 3),
            "book_imbalance": round(float(rng.uniform(-1, 1)), 3),
            "news": bool(rng.random() < 0.1),
            "hour": int(rng.integers(0, 24)),
            "regime": str(rng.choice(regimes, p=[0.45 - 0.15 * t, 0.3, 0.25 + 0.15 * t])),
            "session": str(rng.choice(sessions, p=[0.3, 0.35, 0.35])),
        }
        volume_min = 0.3 + 0.6 * t
        if f["ret_5"] > edge and f["volume_z"] > volume_min and f["rsi"] < 70 and f["regime"] != "volatile":
            label = "long"
        elif f["ret_5"] < -edge and f["book_imbalance"] < -0.1 and f["session"] != "asia" and f["spread_bps"] < 4:
            label = "short"
        else:
            label = "skip"
        if rng.random() < 0.06:
            label = str(rng.choice(LABELS["trading"]))
        rows.append({"id": f"ev-{start + i:06d}", "features": f, "label": label})
    return rows


def write_set(name: str, out_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    out = Path(out_dir) / name
    if name == "demo":
        return write_demo(out)
    if name in TRADING:
        n_train, n_val, edge, drift = TRADING[name]
        if drift:  # one stream in time order: the latest events are val
            rows = trading_rows(n_train + n_val, seed, edge, drift)
            train, val = rows[:n_train], rows[n_train:]
        else:  # train and val drawn apart; the 4k and 40k sets share their val rows
            train, val = trading_rows(n_train, seed, edge, drift), trading_rows(n_val, seed + 1000, edge, drift, 10**6)
        return write_rows(out / "train.jsonl", train), write_rows(out / "val.jsonl", val)
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
