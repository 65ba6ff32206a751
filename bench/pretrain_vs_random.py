"""Does the pretrain stage pay off? The same LoRA run over the ``clm``-pretrained tiny base and over the random base,
on demo records of a chosen size; prints the val macro-F1 by epoch and samples/s of each.

    python bench/pretrain_vs_random.py WORK_DIR N_TRAIN N_VAL [--labelled N] [override ...]
    python bench/pretrain_vs_random.py /tmp/pvr 2400 600 trainer.max_epochs=3      # docs/performance.md

``--labelled N``: only the first N train rows keep their labels; the others become unlabelled
``pretrain.extra_files`` (the domain-adaptive case: few labels, many unlabelled records).

Each arm: ``baseline=none calibration=none export.zip=false hardware.torch_threads=1`` plus the overrides; the
pretrained base is cached under ``WORK_DIR/cache`` (a rerun pretrains once).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from hydra import compose, initialize_config_dir  # noqa: E402

from loralab.data.demo import write_demo  # noqa: E402
from loralab.lifecycle import run as train  # noqa: E402
from loralab.paths import conf_dir  # noqa: E402


def main() -> None:
    work, n_train, n_val, extra = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    os.environ.setdefault("LORALAB_CACHE", str(work / "cache"))
    train_file, val_file = write_demo(work / "data", n_train=n_train, n_val=n_val)
    if extra[:1] == ["--labelled"]:
        n_labelled, extra = int(extra[1]), extra[2:]
        rows = [json.loads(line) for line in train_file.read_text().splitlines()]
        train_file, unlabelled = work / "labelled.jsonl", work / "unlabelled.jsonl"
        train_file.write_text("".join(json.dumps(r) + "\n" for r in rows[:n_labelled]))
        unlabelled.write_text(
            "".join(json.dumps({"id": r["id"], "features": r["features"]}) + "\n" for r in rows[n_labelled:])
        )
        extra = [f"pretrain.extra_files=[{unlabelled}]", *extra]
    for pretrain in ("clm", "none"):
        args = [
            "data=jsonl",
            f"data.train_file={train_file}",
            f"data.val_file={val_file}",
            "baseline=none",
            "export.zip=false",
            "calibration=none",
            "hardware.torch_threads=1",
            "quiet=true",
            f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
            f"paths.output_dir={work / pretrain}",
            *extra,
            f"pretrain={pretrain}",
        ]
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose("train", overrides=args)
        start = time.time()
        train(cfg)
        history = json.loads((work / pretrain / "training_summary.json").read_text())["history"]
        print(
            f"pretrain={pretrain}: val macro-F1 by epoch {[round(h['val_macro_f1'], 3) for h in history]}, "
            f"train samples/s {[round(h['train_samples_per_s']) for h in history]}, {time.time() - start:.0f} s "
            f"with the stage",
            flush=True,
        )


if __name__ == "__main__":
    main()
