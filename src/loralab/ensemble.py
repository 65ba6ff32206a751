"""Blending the learned classifier with the in-run scikit-learn baseline (``ensemble=blend``), measured honestly.

The blend is a weighted geometric mean of the two calibrated probability vectors (a temperature per side, the
baseline's on the log of its probabilities), ``softmax(w * log p_model + (1 - w) * log p_baseline)``, with ``w``
from a grid over [0, 1] (1: the model alone, 0: the baseline alone). Fine-tuned LMs tend to lose to
gradient-boosted trees on numeric tables and fusing the two beats both (LLM-Boost, arXiv 2502.02672); one weight
is all a few hundred val rows can choose without overfitting.

The only labelled rows neither model trained on are the val split's, so the weight is chosen there and its worth
is reported by cross-fitting: the val split is cut into k stratified folds; for each fold both temperatures and
the weight are fit on the other k-1 folds and the held-out fold is scored with them. The out-of-fold metrics of
model, baseline and blend are never scored on rows that chose their temperature or weight (the model's best epoch
is still chosen on val, by early stopping). The exported weight and baseline temperature are then fit on the whole
val split, beside the run's own model temperature. The fitted baseline travels with the export as a
skops file, which loads without unpickling: only the types in ``TRUSTED_TYPES`` are accepted beyond skops' own.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import skops.io
from scipy.special import softmax
from sklearn.model_selection import StratifiedKFold

from loralab.calibrate import fit_temperature, nll, probabilities
from loralab.data.timeorder import blocks
from loralab.errors import ExportError
from loralab.fs import atomic_path
from loralab.metrics import classification_metrics

log = logging.getLogger(__name__)

BASELINE_FILE = "baseline/model.skops"  # inside the export: listed in the loralab.json manifest like the weights
# Beyond skops' defaults (numpy, builtins, scikit-learn estimators): what the HGB pipeline holds. Anything else in
# a file is refused before it is loaded.
TRUSTED_TYPES = ("sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",)
EPS = 1e-12  # probability floor before the log: a baseline's hard 0 must not veto the model's evidence
SELECT = ("macro_f1", "log_loss")


def weight_grid(n: int) -> list[float]:
    """``n`` weights evenly from 0 to 1, rounded so they print and compare as written (0.1, not 0.1000000001)."""
    return [round(float(w), 6) for w in np.linspace(0.0, 1.0, n)]


def blend(model_probs: np.ndarray, base_probs: np.ndarray, weight: float) -> np.ndarray:
    """``softmax(w log p_model + (1 - w) log p_baseline)`` row by row; ``w`` 1 or 0 returns that side as is."""
    if weight == 1.0:
        return np.asarray(model_probs, dtype=np.float64)
    if weight == 0.0:
        return np.asarray(base_probs, dtype=np.float64)
    z = weight * np.log(np.clip(model_probs, EPS, 1.0)) + (1.0 - weight) * np.log(np.clip(base_probs, EPS, 1.0))
    return softmax(z, axis=1)


def calibrated_baseline(base_probs: np.ndarray, temperature: float) -> np.ndarray:
    """The baseline's probabilities with a temperature on their logs, ``softmax(log p / T)``: boosted trees fit with
    class weights are often over- or under-confident, and the blend should mix calibrated evidence on both sides."""
    if temperature == 1.0:  # calibration=none: the baseline's own probabilities, as is
        return np.asarray(base_probs, dtype=np.float64)
    return probabilities(np.log(np.clip(base_probs, EPS, 1.0)), temperature)


def scores(probs: np.ndarray, y: Sequence[int]) -> dict[str, float]:
    """macro-F1 and accuracy of the argmax (as ``classification_metrics`` scores the model) and the log-loss."""
    names = [str(i) for i in range(probs.shape[1])]
    s = classification_metrics(y, probs.argmax(1), names, prefix="")["scalars"]
    return {"macro_f1": s["macro_f1"], "accuracy": s["accuracy"], "log_loss": nll(probs, y)}


def choose_weight(
    model_probs: np.ndarray,
    base_probs: np.ndarray,
    y: Sequence[int],
    weights: Sequence[float],
    select: str = "macro_f1",
) -> float:
    """The grid weight that scores best on these rows: highest macro-F1, ties to the lower log-loss
    (``select="macro_f1"``), or the lowest log-loss (``"log_loss"``). Equal on both: the first in grid order."""
    if select not in SELECT:
        raise ValueError(f"ensemble.select={select!r}: must be one of {list(SELECT)}")

    def key(w: float) -> tuple[float, ...]:
        s = scores(blend(model_probs, base_probs, w), y)
        return (-s["log_loss"],) if select == "log_loss" else (s["macro_f1"], -s["log_loss"])

    keys = [key(w) for w in weights]
    return weights[max(range(len(weights)), key=lambda i: keys[i])]  # max keeps the first of equal keys


def folds(y: Sequence[int], k: int, seed: int, order: Sequence[float] | None = None) -> list[np.ndarray]:
    """Held-out row indices of ``k`` stratified, shuffled folds (at most as many as the largest class has rows, at
    least 2; scikit-learn warns when a class has fewer rows than folds). With ``order`` (each row's time, under
    data.split=time | walk_forward) the folds are ``k`` contiguous blocks in time instead, the seed unused."""
    y = np.asarray(y)
    if order is not None:
        return blocks(order, max(2, min(k, len(y))))
    k = max(2, min(k, int(np.bincount(y).max())))
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [test for _, test in splitter.split(np.zeros(len(y)), y)]


def cross_fit(
    model_logits: np.ndarray,
    base_probs: np.ndarray,
    y: Sequence[int],
    *,
    temperature: float,
    k: int = 5,
    seed: int = 0,
    grid: int = 11,
    select: str = "macro_f1",
    calibrate: bool = True,
    t_bounds: Sequence[float] = (0.05, 20.0),
    fold_rows: Sequence[np.ndarray] | None = None,
    fit_rows: Sequence[np.ndarray] | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """Out-of-fold metrics of model, baseline and blend, and the weight to export; returns that report (JSON) and
    the exported blend's val probabilities.

    ``model_logits``: the model's raw val logits (log-probabilities do as well, with ``calibrate=False``);
    ``base_probs``: the baseline's raw probabilities; ``temperature``: the model's, fit on the whole val split, used
    for the exported weight only. With ``calibrate`` each fold refits the model's and the baseline's temperature on
    its k-1 training folds, and the baseline's exported one is fit on all of val; without, both stay 1.
    ``fold_rows``: the held-out indices (default ``folds``); ``fit_rows``: per fold, the rows that fit it (default
    every other row; ``timeorder.purged_folds`` purges and embargoes them around time-ordered folds).
    """
    logits, base_probs, y = np.asarray(model_logits, np.float64), np.asarray(base_probs, np.float64), np.asarray(y)
    weights = weight_grid(grid)
    fold_rows = list(fold_rows) if fold_rows is not None else folds(y, k, seed)
    base_logs = np.log(np.clip(base_probs, EPS, 1.0))
    oof = {who: np.zeros_like(base_probs) for who in ("model", "baseline", "blend")}
    fold_weights, fold_temps = [], []
    for n, held_out in enumerate(fold_rows):
        fit = np.setdiff1d(np.arange(len(y)), held_out) if fit_rows is None else np.asarray(fit_rows[n])
        t_model, t_base = (
            (fit_temperature(z[fit], y[fit], t_bounds) if calibrate else 1.0) for z in (logits, base_logs)
        )
        probs, base = probabilities(logits, t_model), calibrated_baseline(base_probs, t_base)
        w = choose_weight(probs[fit], base[fit], y[fit], weights, select)
        oof["model"][held_out], oof["baseline"][held_out] = probs[held_out], base[held_out]
        oof["blend"][held_out] = blend(probs[held_out], base[held_out], w)
        fold_weights.append(w)
        fold_temps.append({"model": t_model, "baseline": t_base})
    t_base = fit_temperature(base_logs, y, t_bounds) if calibrate else 1.0
    model_probs, base = probabilities(logits, temperature), calibrated_baseline(base_probs, t_base)
    weight = choose_weight(model_probs, base, y, weights, select)
    choice = "model" if weight == 1.0 else "baseline" if weight == 0.0 else "blend"
    oof = {who: scores(p, y) for who, p in oof.items()}
    report = {
        "method": "blend",
        "choice": choice,
        "weight": weight,
        "baseline_temperature": t_base,
        "select": select,
        "grid": weights,
        "folds": len(fold_rows),
        "rows": len(y),
        "fold_weights": fold_weights,
        "fold_temperatures": fold_temps,
        "oof": oof,
        "baseline_file": BASELINE_FILE,
        "trusted_types": list(TRUSTED_TYPES),
    }
    log.info(
        "ensemble: out-of-fold macro-F1 model %.4f, baseline %.4f, blend %.4f (%d folds of %d val rows); "
        "exported weight %.2f -> %s",
        oof["model"]["macro_f1"],
        oof["baseline"]["macro_f1"],
        oof["blend"]["macro_f1"],
        len(fold_rows),
        len(y),
        weight,
        choice,
    )
    return report, blend(model_probs, base, weight)


def save_baseline(model: Any, path: str | Path) -> Path:
    """The fitted baseline as a skops file (no pickle), written atomically."""
    with atomic_path(path) as tmp:
        skops.io.dump(model, tmp)
    return Path(path)


def load_baseline(path: str | Path) -> Any:
    """Load a skops baseline, refusing any type beyond skops' defaults and ``TRUSTED_TYPES`` before it is built."""
    try:
        untrusted = skops.io.get_untrusted_types(file=path)
    except Exception as err:  # not a skops zip: corrupt or replaced
        raise ExportError(f"{path}: not a readable skops file ({err})") from err
    if unexpected := sorted(set(untrusted) - set(TRUSTED_TYPES)):
        raise ExportError(
            f"{path}: refusing to load untrusted types {unexpected[:5]} (trusted beyond skops' "
            f"defaults: {list(TRUSTED_TYPES)})"
        )
    return skops.io.load(path, trusted=untrusted)
