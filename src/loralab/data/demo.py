"""Deterministic demo data in the Layer-3 feature format, so the offline demo needs no download.

The label follows a rule a model can learn (aligned external/internal direction, a change of character in that
direction and a strong wave), plus label noise and distractor features; ``long`` and ``short`` are minorities
under 25%, so oversampling and class weights have work to do.
"""

from __future__ import annotations

import random
from pathlib import Path

from loralab.data.records import write_rows

SESSIONS = ["asia", "london", "new_york", "overlap"]


def _features(rng: random.Random, label: str) -> dict:
    if label == "skip":
        # Any setup that breaks at least one condition of a trade.
        direction = rng.choice([1, -1])
        broken = rng.choice(["int_dir", "choch", "wave"])
        int_dir = -direction if broken == "int_dir" else direction
        choch_in_dir = broken != "choch"
        wave = rng.uniform(0.05, 0.45) if broken == "wave" else rng.uniform(0.05, 0.95)
    else:
        direction = 1 if label == "long" else -1
        int_dir, choch_in_dir, wave = direction, True, rng.uniform(0.55, 0.95)
    return {
        "ext_dir": direction,
        "int_dir": int_dir,
        "choch_bull": choch_in_dir if direction == 1 else rng.random() < 0.3,
        "choch_bear": choch_in_dir if direction == -1 else rng.random() < 0.3,
        "fvg_bull": rng.random() < 0.5,
        "fvg_bear": rng.random() < 0.5,
        "mgann_leg_index": rng.randint(1, 7),
        "wave_strength": round(wave, 2),
        "atr": round(rng.lognormvariate(0.0, 0.5), 3),
        "session": rng.choice(SESSIONS),
    }


def make_rows(n: int, seed: int, noise: float = 0.08, start_id: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = rng.choices(["long", "short", "skip"], weights=[0.2, 0.2, 0.6])[0]
        features = _features(rng, label)
        if rng.random() < noise:
            label = rng.choice(["long", "short", "skip"])
        rows.append({"id": f"demo-{start_id + i:06d}", "features": features, "label": label})
    return rows


def write_demo(out_dir: str | Path, n_train: int = 2400, n_val: int = 600, seed: int = 7) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``val.jsonl`` (disjoint ids); rewriting gives byte-identical files."""
    out = Path(out_dir)
    return (
        write_rows(out / "train.jsonl", make_rows(n_train, seed, start_id=0)),
        write_rows(out / "val.jsonl", make_rows(n_val, seed + n_train, start_id=n_train)),
    )


if __name__ == "__main__":
    import sys

    print(*write_demo(sys.argv[1] if len(sys.argv) > 1 else "data/demo"), sep="\n")
