"""loralab models as MLflow models (``mlflow.pyfunc``): what a finished run logs so that ``mlflow.pyfunc.load_model``,
the model registry and ``mlflow models serve`` work on it like on any MLflow model.

Each model is logged *from code* (``model_code.py``: MLflow runs that file to build the model when loading it; the
``PythonModel`` class it serves is named in the model's artifact ``served_by.txt``), so loading unpickles nothing;
the weights travel as the run's own safetensors files (artifacts), and scoring goes through the same functions as
``loralab-predict``.
The files import ``loralab``: it must be installed where the model is loaded or served (``--env-manager local``).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import AnyType, ColSpec, DataType, Map, Schema

from loralab.data.records import DataError, Record, record_from_row
from loralab.export import META_FILE
from loralab.tracking.mlflow import SERVED_BY

log = logging.getLogger(__name__)

EXAMPLE_ROWS = 3  # input example rows stored with the model (the UI and `mlflow models serve` docs show them)
BATCH_SIZE = 64  # as loralab-predict's default: the same batches, so the same padding


def requirements(packages: Mapping[str, str]) -> list[str]:
    """pip requirements of a logged model: the run's package versions (provenance) and loralab itself, given
    rather than inferred (MLflow would load the model once more to find them)."""
    try:
        own = [f"loralab=={version('loralab')}"]
    except PackageNotFoundError:  # run from a source tree without installing
        own = []
    return [*own, *(f"{p}=={v}" for p, v in packages.items())]


class TaskModel(PythonModel):
    """The model ``model_code.py`` sets: it builds the ``PythonModel`` class named in the artifact ``SERVED_BY``
    (``module.Class``; imported, never unpickled) and hands it every call."""

    def load_context(self, context) -> None:
        path = Path(context.artifacts[SERVED_BY]).read_text(encoding="utf-8").strip()
        module, _, name = path.rpartition(".")
        cls = getattr(importlib.import_module(module), name, None)
        if not (isinstance(cls, type) and issubclass(cls, PythonModel)):
            raise TypeError(f"{SERVED_BY}: {path!r} is not an mlflow.pyfunc.PythonModel class")
        self.served = cls()
        self.served.load_context(context)

    def predict(self, context, model_input, params=None):
        return self.served.predict(context, model_input, params)


def _rows(model_input: Any) -> list[dict[str, Any]]:
    """A DataFrame, a list of records or one record, as dicts; a cell a row does not have (NaN, None) is dropped."""
    if isinstance(model_input, pd.DataFrame):
        model_input = model_input.to_dict("records")
    elif isinstance(model_input, Mapping):
        model_input = [model_input]
    return [
        {k: v for k, v in row.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
        for row in model_input
    ]


# --- classification: calibrated probabilities of an export ---------------------------------------------------------

CLASSIFIER_SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(AnyType(), "id", required=False), ColSpec(Map(AnyType()), "features")]),
    outputs=Schema(
        [ColSpec(AnyType(), "id"), ColSpec(DataType.string, "label"), ColSpec(Map(DataType.double), "probs")]
    ),
)
# decision=precision: the decided label, whether the model abstained (answered the fallback), the probabilities.
DECIDING_SIGNATURE = ModelSignature(
    inputs=CLASSIFIER_SIGNATURE.inputs,
    outputs=Schema(
        [
            ColSpec(AnyType(), "id"),
            ColSpec(DataType.string, "label"),
            ColSpec(DataType.boolean, "abstained"),
            ColSpec(Map(DataType.double), "probs"),
        ]
    ),
)


class Classifier(PythonModel):
    """Rows ``{"id", "features": {...}}`` (a DataFrame or records) → ``id``, ``label``, ``probs`` ({label: p}),
    and ``abstained`` under ``decision=precision``: the rows ``loralab-predict`` writes, from the same functions
    (validation, serialization, batching, temperature, thresholds). A row ``loralab-predict`` would drop is an error
    here, naming the row and the rule."""

    def load_context(self, context) -> None:
        from loralab.core.device import resolve_device
        from loralab.inference import load_exported  # torch/transformers load with the model, not at import

        self.exported = load_exported(Path(context.artifacts[META_FILE]).parent, resolve_device("auto"))

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        from loralab.inference import predict_probs

        exported = self.exported
        records: list[Record] = []
        for i, row in enumerate(_rows(model_input)):
            record = record_from_row({"id": i, **row}, labels=None, allow_null=exported.meta.get("allow_null", False))
            if isinstance(record, str):
                raise DataError(f"row {i} (id {row.get('id', i)!r}): {record}")
            records.append(record)
        if not records:
            columns = ["id", "label", *(["abstained"] if exported.decision else []), "probs"]
            return pd.DataFrame(columns=columns)
        probs = predict_probs(exported, records, BATCH_SIZE)  # with ensemble=blend: the blend, as predict serves
        return pd.DataFrame([{"id": r.id, **a} for r, a in zip(records, exported.answers(probs))])


def log_classifier(
    tracker, out_dir: Path, parts: Sequence[str], examples: Sequence[Record], packages: Mapping[str, str]
) -> str | None:
    """Log the export in ``out_dir`` as the run's MLflow model: ``loralab.json`` and ``merged/`` (or, when merged
    was left out of ``parts``, the adapter and a random base). Returns the model's URI."""
    chosen = ["merged"] if "merged" in parts else [p for p in parts if p in ("adapter", "base")]
    chosen += [p for p in parts if p == "baseline"]  # ensemble=blend: the skops baseline the blend needs
    example = pd.DataFrame([{"id": r.id, "features": r.features} for r in examples[:EXAMPLE_ROWS]])
    decides = "decision" in json.loads((out_dir / META_FILE).read_text(encoding="utf-8"))
    return tracker.log_model(
        Classifier,
        {p: out_dir / p for p in (META_FILE, *chosen)},
        DECIDING_SIGNATURE if decides else CLASSIFIER_SIGNATURE,
        example,
        requirements(packages),
    )


# --- tabular regression: the MLP on feature columns -----------------------------------------------------------------

CHECKPOINT, SCHEMA, METADATA = "model_best.pt", "feature_schema.txt", "training_metadata.json"


class TabularRegressor(PythonModel):
    """A DataFrame with one column per feature of the schema (any others are ignored) → one column per target."""

    def load_context(self, context) -> None:
        from loralab.data.hdf5 import read_schema
        from loralab.models.mlp import load_best

        self.model, _ = load_best(context.artifacts[CHECKPOINT])  # torch.load(weights_only=True)
        self.features = read_schema(context.artifacts[SCHEMA])
        self.targets = json.loads(Path(context.artifacts[METADATA]).read_text())["target_names"]

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        import torch

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(_rows(model_input))
        missing = [f for f in self.features if f not in frame.columns]
        if missing:
            raise DataError(
                f"input lacks feature column(s) {missing[:5]} of the schema ({len(self.features)} features)"
            )
        x = torch.tensor(frame[self.features].to_numpy(np.float32))
        with torch.no_grad():
            y = self.model(x).logits.numpy()
        return pd.DataFrame(y.astype(np.float64), columns=self.targets)


def log_tabular_regressor(
    tracker, checkpoint: Path, schema_file: Path, metadata_file: Path, features: np.ndarray, packages: Mapping[str, str]
) -> str | None:
    """Log ``checkpoint`` (``model_best.pt``) with its feature schema and metadata as the run's MLflow model;
    ``features``: a few rows of X for the input example."""
    from loralab.data.hdf5 import read_schema

    names = read_schema(schema_file)
    targets = json.loads(Path(metadata_file).read_text())["target_names"]
    signature = ModelSignature(
        inputs=Schema([ColSpec(DataType.double, n) for n in names]),
        outputs=Schema([ColSpec(DataType.double, t) for t in targets]),
    )
    example = pd.DataFrame(np.asarray(features[:EXAMPLE_ROWS], dtype=np.float64), columns=names)
    return tracker.log_model(
        TabularRegressor,
        {CHECKPOINT: checkpoint, SCHEMA: schema_file, METADATA: metadata_file},
        signature,
        example,
        requirements(packages),
    )


# --- text regression: the article model on title + content ---------------------------------------------------------

CHECKPOINT_DIR = "checkpoint"


class TextRegressor(PythonModel):
    """Articles (``title``, ``content``; a DataFrame or records) → one column per dimension: the run's full
    ``checkpoint_best/`` weights on the texts of its ``data.template``, scored as ``loralab-predict`` scores. A row
    training would drop for its text (no title or content, not a string) is an error naming the row and the rule."""

    def load_context(self, context) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from loralab.core.checkpoint import read_model_meta
        from loralab.core.device import resolve_device

        root = Path(context.artifacts[CHECKPOINT_DIR])
        self.meta = read_model_meta(root)  # every file checked against its manifest first
        self.model = (
            AutoModelForSequenceClassification.from_pretrained(root, dtype=torch.float32, use_safetensors=True)
            .to(resolve_device("auto"))
            .eval()
        )
        self.tokenizer = AutoTokenizer.from_pretrained(root)
        self.tokenizer.padding_side = "right"  # the head pools the last non-pad token
        self.tokenizer.truncation_side = self.meta.get("truncation_side", "right")

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        from loralab.data.articles import text_of_row
        from loralab.data.text import TokenizedTexts
        from loralab.inference import score_texts

        dims, template, max_length = self.meta["dimension_names"], self.meta["template"], self.meta["max_length"]
        texts = []
        for i, row in enumerate(_rows(model_input)):
            text = text_of_row(row)
            if isinstance(text, str):
                raise DataError(
                    f"row {i} (id {row.get('id', i)!r}): {text} (needs a non-empty string title and/or content)"
                )
            texts.append(template.format(title=text[0], content=text[1]))
        if not texts:
            return pd.DataFrame(columns=dims)
        ds = TokenizedTexts(texts, list(range(len(texts))), None, self.tokenizer, max_length)
        return pd.DataFrame(
            score_texts(self.model, self.tokenizer, ds, max_length, BATCH_SIZE).astype(np.float64), columns=dims
        )


TEXT_INPUTS = Schema(
    [
        ColSpec(AnyType(), "id", required=False),
        ColSpec(DataType.string, "title", required=False),
        ColSpec(DataType.string, "content", required=False),
    ]
)


def log_text_regressor(
    tracker, checkpoint: Path, dims: Sequence[str], examples: Sequence[Any], packages: Mapping[str, str]
) -> str | None:
    """Log ``checkpoint`` (a full model's directory: safetensors, tokenizer, ``loralab_checkpoint.json``) as the
    run's MLflow model; ``examples``: a few articles for the input example."""
    signature = ModelSignature(inputs=TEXT_INPUTS, outputs=Schema([ColSpec(DataType.double, d) for d in dims]))
    example = pd.DataFrame([{"id": a.id, "title": a.title, "content": a.content} for a in examples[:EXAMPLE_ROWS]])
    return tracker.log_model(TextRegressor, {CHECKPOINT_DIR: checkpoint}, signature, example, requirements(packages))
