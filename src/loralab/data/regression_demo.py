"""Deterministic, offline demo data for the regression experiments.

* MarketSentinel: ``train.h5`` / ``val.h5`` (``X`` float32 N × F, ``y`` N × 2) and ``feature_schema.txt``. Features
  are autocorrelated series (a time series, split in time: val follows train); head 0 is linear in a few features,
  head 1 non-linear, both with noise, and some features are distractors.
* Articles: JSONL rows ``{id, title, content, labels, dimension_names}`` whose scores follow the words used
  (topic words → relevance, tone words → sentiment, alarm words → urgency), plus noise.

``python -m loralab.data.regression_demo [tabular|articles] OUT_DIR``
"""

from __future__ import annotations

import random
from pathlib import Path

import h5py
import numpy as np

from loralab.data.records import write_rows
from loralab.fs import atomic_path, atomic_write_text

FEATURES = [
    "ret_1d",
    "ret_5d",
    "ret_20d",
    "vol_5d",
    "vol_20d",
    "rsi_14",
    "macd",
    "volume_z",
    "spread_bp",
    "skew_20d",
    "kurt_20d",
    "gap_open",
]
DIMENSIONS = ["relevance", "sentiment", "urgency"]


def _atomic_h5(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as fh:  # parallel jobs may write the demo at once
        fh.create_dataset("X", data=x, track_times=False)  # track_times=False: rewriting is byte-identical
        fh.create_dataset("y", data=y, track_times=False)


def tabular_arrays(n: int, seed: int, n_features: int = len(FEATURES)) -> tuple[np.ndarray, np.ndarray]:
    """``X`` (n × n_features, float32, AR(1) columns) and ``y`` (n × 2) in time order."""
    rng = np.random.default_rng(seed)
    x = np.empty((n, n_features))
    x[0] = rng.normal(size=n_features)
    for t in range(1, n):
        x[t] = 0.8 * x[t - 1] + 0.6 * rng.normal(size=n_features)  # stationary, unit-ish variance
    head0 = 0.8 * x[:, 0] - 0.5 * x[:, 2] + 0.3 * x[:, 5] + 0.3 * rng.normal(size=n)
    head1 = np.tanh(x[:, 1] * x[:, 3]) + 0.4 * np.abs(x[:, 4]) + 0.2 * rng.normal(size=n)
    return x.astype(np.float32), np.stack([head0, head1], axis=1).astype(np.float32)


def write_tabular_demo(
    train_file: str | Path,
    val_file: str | Path,
    schema_file: str | Path,
    n_train: int = 3000,
    n_val: int = 750,
    seed: int = 11,
) -> tuple[Path, Path, Path]:
    """One series of ``n_train + n_val`` steps: the first part is train, the rest val (no look-ahead)."""
    paths = [Path(p) for p in (train_file, val_file, schema_file)]
    x, y = tabular_arrays(n_train + n_val, seed)
    _atomic_h5(paths[0], x[:n_train], y[:n_train])
    _atomic_h5(paths[1], x[n_train:], y[n_train:])
    atomic_write_text(paths[2], "".join(f"{name}\n" for name in FEATURES[: x.shape[1]]))
    return paths[0], paths[1], paths[2]


TOPIC = ["earnings", "revenue", "guidance", "merger", "dividend", "buyback", "acquisition", "forecast"]
POSITIVE = ["beats", "surges", "record", "strong", "upgrade", "growth", "rally", "gains"]
NEGATIVE = ["misses", "plunges", "weak", "downgrade", "loss", "lawsuit", "slump", "cuts"]
ALARM = ["breaking", "halted", "urgent", "emergency", "recall", "default"]
FILLER = [
    "the company said",
    "analysts noted",
    "in a statement on tuesday",
    "according to people familiar",
    "shares of the firm",
    "the market",
    "investors",
    "a spokesperson",
    "the board",
    "later this week",
]
COMPANIES = ["Acme", "Globex", "Initech", "Umbrella", "Stark", "Wayne", "Hooli", "Soylent", "Tyrell", "Cyberdyne"]


def make_articles(n: int, seed: int, start_id: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        n_topic, n_pos, n_neg, n_alarm = (
            rng.randint(0, 3),
            rng.randint(0, 3),
            rng.randint(0, 3),
            rng.choice([0, 0, 0, 1, 2]),
        )
        words = (
            rng.choices(TOPIC, k=n_topic)
            + rng.choices(POSITIVE, k=n_pos)
            + rng.choices(NEGATIVE, k=n_neg)
            + rng.choices(ALARM, k=n_alarm)
        )
        rng.shuffle(words)
        company = rng.choice(COMPANIES)
        sentences = []
        for word in words + [None] * rng.randint(1, 3):
            filler = rng.choice(FILLER)
            sentences.append(f"{filler} {word} at {company}." if word else f"{filler} {company}.")
        rng.shuffle(sentences)
        title_words = words[:2] or [rng.choice(FILLER).split()[-1]]
        scores = [
            min(10.0, 2.0 + 2.5 * n_topic + rng.gauss(0, 0.5)),
            max(-5.0, min(5.0, 1.5 * (n_pos - n_neg) + rng.gauss(0, 0.5))),
            min(10.0, 1.0 + 4.0 * n_alarm + rng.gauss(0, 0.5)),
        ]
        rows.append(
            {
                "id": f"art-{start_id + i:06d}",
                "title": f"{company} {' '.join(title_words)}",
                "content": " ".join(s[0].upper() + s[1:] for s in sentences),
                "labels": [round(s, 2) for s in scores],
                "dimension_names": list(DIMENSIONS),
            }
        )
    return rows


def write_article_demo(
    out_dir: str | Path, n_train: int = 480, n_val: int = 120, seed: int = 5
) -> tuple[Path, Path, Path]:
    """``train.jsonl`` and ``val.jsonl`` (disjoint ids) plus ``labeled.jsonl`` (both, for ``loralab.data.prepare``)."""
    out = Path(out_dir)
    train, val = make_articles(n_train, seed), make_articles(n_val, seed + 1, start_id=n_train)
    return (
        write_rows(out / "train.jsonl", train),
        write_rows(out / "val.jsonl", val),
        write_rows(out / "labeled.jsonl", train + val),
    )


if __name__ == "__main__":
    import sys

    kind = sys.argv[1] if len(sys.argv) > 1 else "tabular"
    if kind == "tabular":
        out = Path(sys.argv[2] if len(sys.argv) > 2 else "data/demo/marketsentinel")
        print(*write_tabular_demo(out / "train.h5", out / "val.h5", out / "feature_schema.txt"), sep="\n")
    else:
        print(*write_article_demo(sys.argv[2] if len(sys.argv) > 2 else "data/demo/articles"), sep="\n")
