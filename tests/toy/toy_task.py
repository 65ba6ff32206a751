"""A task defined outside the package, the way a user adds one: JSONL records with numeric features → a one-layer
MLP over the feature vector → class logits, cross-entropy, macro-F1; the best weights saved as safetensors and
logged as an MLflow model. This module and ``conf/experiment/toy.yaml`` beside it are all it takes; the lifecycle
gives it resume, signals, top-k checkpoints, sweeps and MLflow tracking.

    PYTHONPATH=tests/toy python train.py hydra.searchpath=[file://tests/toy/conf] experiment=toy \\
        data.train_file=train.jsonl data.val_file=val.jsonl
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from hydra.utils import instantiate
from mlflow.models import infer_signature
from mlflow.pyfunc import PythonModel
from omegaconf import MISSING, DictConfig
from safetensors.torch import load_file, save_file
from sklearn.feature_extraction import DictVectorizer
from torch import nn

from loralab.config import RunConf
from loralab.config.cross import require
from loralab.config.tasks import LossConf, MLPModelConf, RecordsDataConf
from loralab.core.loaders import TaskData
from loralab.data.splits import build_splits
from loralab.metrics import MetricNames, classification_metric_names, classification_metrics
from loralab.models.mlp import MLPRegressor
from loralab.tasks.base import Finalized, Task

WEIGHTS, META = "toy_model.safetensors", "toy_model.json"


@dataclass
class ToyConf(RunConf):
    """The root schema: which data, model and loss groups a toy run takes."""

    data: RecordsDataConf = MISSING
    model: MLPModelConf = MISSING
    loss: LossConf = MISSING

    def output_names(self) -> list[str]:
        return list(self.data.labels)


class ToyClassifier(Task):
    name = "toy"
    schema = ToyConf
    conf: ToyConf

    @classmethod
    def metric_names(cls, cfg: DictConfig) -> MetricNames:
        return classification_metric_names(list(cfg.data.labels))

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        require(cfg.data.template == "{features}", "data.template", cfg.data.template, "the toy model reads numbers")

    def build_data(self) -> TaskData:
        d, labels = self.conf.data, self.conf.output_names()
        splits = build_splits(
            d.train_file,
            d.val_file,
            labels,
            val_split=d.val_split,
            seed=self.conf.seed,
            leakage=str(d.leakage),
        )
        self.vectorizer = DictVectorizer(sparse=False).fit([r.features for r in splits.train])
        self.val_rows = splits.val
        return TaskData(*(self.dataset(rows, labels) for rows in (splits.train, splits.val)))

    def dataset(self, rows, labels) -> list[dict[str, torch.Tensor]]:
        x = torch.tensor(self.vectorizer.transform([r.features for r in rows]), dtype=torch.float32)
        return [{"features": x[i], "labels": torch.tensor(labels.index(r.label))} for i, r in enumerate(rows)]

    def build_model(self) -> nn.Module:
        return instantiate(
            self.conf.model, input_dim=len(self.vectorizer.feature_names_), output_dim=len(self.conf.output_names())
        ).to(self.ctx.device)

    def loss(self) -> nn.Module:
        return instantiate(self.conf.loss)

    def metrics(self, y: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
        return classification_metrics(y, outputs.argmax(-1), self.conf.output_names())["scalars"]

    def finalize(self, model: nn.Module, val_loader, result) -> Finalized:
        out = self.ctx.out_dir
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, out / WEIGHTS)
        (out / META).write_text(
            json.dumps(
                {
                    "features": list(self.vectorizer.feature_names_),
                    "labels": self.conf.output_names(),
                    "hidden_dim": model.hidden_dim,
                }
            )
        )
        example = pd.DataFrame([r.features for r in self.val_rows[:3]])  # the records' own columns
        signature = infer_signature(example, pd.DataFrame({"label": self.conf.output_names()[:1] * len(example)}))
        uri = self.ctx.tracker.log_model(ToyModel, {WEIGHTS: out / WEIGHTS, META: out / META}, signature, example, [])
        return Finalized({**result.best, "best_epoch": result.best_epoch}, [out / WEIGHTS, out / META], uri)


class ToyModel(PythonModel):
    """A DataFrame with one column per feature (the records' ``features``) → the predicted ``label``."""

    def load_context(self, context) -> None:
        self.meta = json.loads(Path(context.artifacts[META]).read_text())
        self.model = MLPRegressor(len(self.meta["features"]), self.meta["hidden_dim"], len(self.meta["labels"]))
        self.model.load_state_dict(load_file(context.artifacts[WEIGHTS]))

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        names = self.meta["features"]  # DictVectorizer's: numbers as they are, strings one-hot (session=asia)
        vectorizer = DictVectorizer(sparse=False)
        vectorizer.feature_names_, vectorizer.vocabulary_ = names, {n: i for i, n in enumerate(names)}
        x = torch.tensor(vectorizer.transform(model_input.to_dict("records")), dtype=torch.float32)
        with torch.no_grad():
            pred = self.model(x).logits.argmax(-1).tolist()
        return pd.DataFrame({"label": [self.meta["labels"][i] for i in pred]})
