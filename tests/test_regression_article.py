"""Article scoring: row validation with counted drops, the regression head (full fine-tune and LoRA), and a whole
run through the Hydra config tracked in a temporary MLflow store, checked down to the saved checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from peft import PeftModel
from sklearn.metrics import mean_absolute_error
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from loralab.config import ConfigError
from loralab.data.articles import article_text, load_articles
from loralab.data.regression_demo import DIMENSIONS, make_articles
from loralab.lifecycle import run as train
from loralab.tasks.text_model import load_text_model
from loralab.tasks.text_regression import load_splits

ROOT = Path(__file__).resolve().parents[1]

# Malformed train lines, each with the reason it must be counted under.
BAD_LINES = [
    ("invalid_json", '{"id": "bad-1", "title": '),
    ("missing_labels", json.dumps({"id": "bad-2", "title": "t", "content": "c", "dimension_names": DIMENSIONS})),
    (
        "label_not_number",
        json.dumps(
            {"id": "bad-3", "title": "t", "content": "c", "labels": ["high", 1, 2], "dimension_names": DIMENSIONS}
        ),
    ),
    (
        "non_finite_value",
        '{"id": "bad-4", "title": "t", "content": "c", "labels": [NaN, 1, 2], '
        '"dimension_names": ["relevance", "sentiment", "urgency"]}',
    ),
    (
        "labels_length_mismatch",
        json.dumps({"id": "bad-5", "title": "t", "content": "c", "labels": [1, 2], "dimension_names": DIMENSIONS}),
    ),
    (
        "dimension_names_mismatch",
        json.dumps(
            {"id": "bad-6", "title": "t", "content": "c", "labels": [1, 2, 3], "dimension_names": ["a", "b", "c"]}
        ),
    ),
    (
        "missing_text",
        json.dumps({"id": "bad-7", "title": " ", "content": "", "labels": [1, 2, 3], "dimension_names": DIMENSIONS}),
    ),
    ("missing_id", json.dumps({"title": "t", "content": "c", "labels": [1, 2, 3], "dimension_names": DIMENSIONS})),
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def articles(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("articles")
    train_rows, val_rows = make_articles(40, seed=1), make_articles(16, seed=2, start_id=1000)
    train = write_jsonl(out / "train.jsonl", [*train_rows, train_rows[0], *(line for _, line in BAD_LINES)])
    return {
        "train": train,
        "val": write_jsonl(out / "val.jsonl", val_rows),
        "train_rows": train_rows,
        "val_rows": val_rows,
    }


def compose_article(data: dict, out_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                "experiment=article_regression",
                "data.demo=false",
                f"data.train_file={data['train']}",
                f"data.val_file={data['val']}",
                f"paths.output_dir={out_dir}",
                "model.tokenizer_vocab_size=300",
                "hardware.torch_threads=1",
                f"tracking.uri=sqlite:///{out_dir}/mlflow.db",
                *overrides,
            ],
        )


def test_bad_rows_are_dropped_and_counted_by_reason(articles):
    kept, report, dims = load_articles(articles["train"], None)
    assert dims == DIMENSIONS  # taken from the first valid row
    assert [a.id for a in kept] == [r["id"] for r in articles["train_rows"]]
    expected = {reason: 1 for reason, _ in BAD_LINES} | {"duplicate_id": 1}
    assert report.as_dict()["dropped_by_reason"] == dict(sorted(expected.items()))
    assert report.rows_read == len(articles["train_rows"]) + 1 + len(BAD_LINES)


def test_val_carved_from_train_is_stratified_deterministic_and_disjoint(tmp_path):
    rows = make_articles(90, seed=3)
    path = write_jsonl(tmp_path / "all.jsonl", rows)
    data = OmegaConf.create(
        {
            "train_file": str(path),
            "val_file": None,
            "dimension_names": None,
            "val_split": 0.2,
            "score_tiers": 3,
            "leakage": "error",
            "max_row_bytes": 2**20,
        }
    )
    train_a, val_a, _, report = load_splits(data, seed=7)
    train_b, val_b, _, _ = load_splits(data, seed=7)
    assert [a.id for a in val_a] == [a.id for a in val_b] and len(val_a) == round(0.2 * len(rows))
    assert not {a.id for a in train_a} & {a.id for a in val_a}
    assert report["val_from_train"]["stratified_by_score_tier"] is True


def test_experiment_composes_regression_with_lora_on_real_models(articles, tmp_path):
    cfg = compose_article(articles, tmp_path)
    assert cfg.task.name == "text_regression" and cfg.model.max_length == 512 and cfg.lora.enabled is False
    assert cfg.loss._target_ == "torch.nn.MSELoss" and cfg.trainer.monitor == "val_mae"
    assert cfg.trainer.monitor_mode == "min"
    real = compose_article(articles, tmp_path, "model=qwen2_5_0_5b", "lora=default")
    assert real.model.hub_id == "Qwen/Qwen2.5-0.5B" and real.model.max_length == 512 and real.lora.r > 0


def test_lora_wraps_the_regression_head(articles, tmp_path):
    cfg = compose_article(articles, tmp_path, "lora=default")
    train_rows, _, dims = load_articles(articles["train"], None)
    source = instantiate(cfg.model)
    tokenizer = source.load_tokenizer([article_text(a, cfg.data.template) for a in train_rows[:8]])
    model = load_text_model(
        source,
        dims,
        tokenizer,
        hardware=cfg.hardware,
        lora=cfg.lora,
        device=torch.device("cpu"),
        problem_type="regression",
    )
    assert isinstance(model, PeftModel) and model.config.problem_type == "regression"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable) and any("lora_" in n for n in trainable)
    enc = tokenizer([article_text(a, cfg.data.template) for a in train_rows[:2]], padding=True, return_tensors="pt")
    assert model(**enc).logits.shape == (2, len(dims))


def test_config_error_is_one_line_before_loading(articles, tmp_path):
    with pytest.raises(ConfigError) as err:
        train(compose_article(articles, tmp_path, "data.template=no fields"))
    assert str(err.value) == "data.template='no fields': must contain {title} and/or {content} and no other {field}"
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_article_run_end_to_end(articles, tmp_path):
    out = tmp_path / "run"
    cfg = compose_article(articles, out, "trainer.max_epochs=2", "optim.lr=1e-3")
    objective = train(cfg)

    history = json.loads((out / "training_history.json").read_text())
    meta = json.loads((out / "training_metadata.json").read_text())
    maes = [h["val_mae"] for h in history]
    best = int(np.argmin(maes)) + 1
    assert objective == min(maes) and meta["best_epoch"] == best and len(history) == 2
    assert meta["data"]["dimension_names"] == DIMENSIONS
    assert meta["data"]["train_file"]["rows_dropped"] == len(BAD_LINES) + 1
    assert meta["config"]["trainer"]["monitor"] == "val_mae"
    for name in ("loss_curves.png", "per_dimension_mae.png"):
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The saved checkpoint is a regression model of the best epoch and reproduces its val MAE on its own.
    ckpt = out / "checkpoint_best"
    model = AutoModelForSequenceClassification.from_pretrained(ckpt).eval()
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    assert model.config.problem_type == "regression" and model.config.num_labels == len(DIMENSIONS)
    assert json.loads((ckpt / "loralab_checkpoint.json").read_text())["epoch"] == best
    rows = articles["val_rows"]
    texts = [cfg.data.template.format(title=r["title"], content=r["content"]) for r in rows]
    with torch.no_grad():
        pred = model(**tokenizer(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")).logits
    assert mean_absolute_error([r["labels"] for r in rows], pred.numpy()) == pytest.approx(min(maes), rel=1e-4)

    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    run = client.search_runs([client.get_experiment_by_name("article_regression").experiment_id])[0]
    assert run.info.status == "FINISHED"
    keys = ["val_mae", "val_rmse", "train_loss", "val_loss"] + [
        f"val_{m}_{d}" for m in ("mae", "rmse") for d in DIMENSIONS
    ]
    for key in keys:
        logged = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [m.value for m in logged] == pytest.approx([h[key] for h in history]), key
    assert run.data.metrics["data.dropped.dimension_names_mismatch"] == 1
