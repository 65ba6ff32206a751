"""A scikit-learn baseline on the same splits as the LLM, so a report can say whether the LLM adds value.

It is fit on the training rows before oversampling (class weights 'balanced' do the rebalancing instead) and
scored with the same ``classification_metrics`` as the model, so the two columns compare like for like.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping, Sequence

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.feature_extraction import DictVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from loralab.data.records import Record
from loralab.metrics import classification_metrics

log = logging.getLogger(__name__)

BASELINES = ("hgb", "logreg")


def build_estimator(name: str, seed: int, params: Mapping[str, Any] | None = None) -> Pipeline:
    """DictVectorizer (strings one-hot, bools and numbers as numbers) followed by the named classifier."""
    params = dict(params or {})
    if name == "hgb":  # HistGradientBoosting needs dense input; tabular features are few, so dense is cheap
        return Pipeline(
            [
                ("vectorize", DictVectorizer(sparse=False)),
                ("classify", HistGradientBoostingClassifier(random_state=seed, **params)),
            ]
        )
    if name == "logreg":  # with_mean=False keeps the one-hot columns sparse
        return Pipeline(
            [
                ("vectorize", DictVectorizer()),
                ("scale", StandardScaler(with_mean=False)),
                ("classify", LogisticRegression(random_state=seed, **params)),
            ]
        )
    raise ValueError(f"baseline {name!r}: unknown, expected one of {BASELINES}")


def feature_dicts(records: Sequence[Record]) -> list[dict[str, Any]]:
    """Features as DictVectorizer reads them; null values (data.allow_null) are left out, i.e. read as 0."""
    return [{k: v for k, v in r.features.items() if v is not None} for r in records]


def fit_estimator(
    name: str,
    train: Sequence[Record],
    labels: Sequence[str],
    seed: int,
    params: Mapping[str, Any] | None = None,
    threads: int | None = None,
) -> tuple[Pipeline, float] | None:
    """The fitted pipeline and its fit time in seconds on ``train`` (labels as their index in ``labels``), or None
    (with a warning) when scikit-learn cannot fit the data, e.g. a single class: a baseline must never cost the run.
    ``threads`` caps OpenMP/BLAS threads: on a host busy with other jobs, spinning OpenMP workers can make a
    sub-second fit take tens of seconds."""
    label2id = {label: i for i, label in enumerate(labels)}
    model = build_estimator(name, seed, params)
    t0 = time.perf_counter()
    with threadpool_limits(threads):
        try:
            model.fit(feature_dicts(train), [label2id[r.label] for r in train])
        except ValueError as err:
            log.warning("baseline %s not fitted: %s", name, err)
            return None
    return model, time.perf_counter() - t0


def predict_proba(model: Pipeline, records: Sequence[Record], n_labels: int, threads: int | None = None) -> np.ndarray:
    """Class probabilities (float64, one column per label in label order): a label the train split lacked gets a
    column of zeros, so the matrix lines up with the learned model's."""
    out = np.zeros((len(records), n_labels))
    classes = model.classes_.astype(int)
    if len(classes) == 1:  # a train split of one class: HGB fits, then answers two columns for it
        out[:, classes[0]] = 1.0
        return out
    with threadpool_limits(threads):
        out[:, classes] = model.predict_proba(feature_dicts(records))
    return out


def fit_baseline(
    name: str,
    train: Sequence[Record],
    val: Sequence[Record],
    labels: Sequence[str],
    seed: int,
    params: Mapping[str, Any] | None = None,
    threads: int | None = None,
    fitted: tuple[Pipeline, float] | None = None,
) -> dict[str, Any] | None:
    """Fit on ``train`` (or take ``fit_estimator``'s ``fitted``), score on ``val``; the result has the shape of
    ``classification_metrics`` plus fit info, or is None when the fit failed."""
    fitted = fitted or fit_estimator(name, train, labels, seed, params, threads)
    if fitted is None:
        return None
    model, fit_time = fitted
    with threadpool_limits(threads):
        pred = model.predict(feature_dicts(val))
    label2id = {label: i for i, label in enumerate(labels)}
    report = classification_metrics([label2id[r.label] for r in val], pred, labels)
    log.info(
        "baseline %s: val_macro_f1 %.4f (fit on %d rows in %.2f s)",
        name,
        report["scalars"]["val_macro_f1"],
        len(train),
        fit_time,
    )
    return {"name": name, "params": dict(params or {}), "train_rows": len(train), "fit_time_s": fit_time, **report}
