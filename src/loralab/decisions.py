"""Decisions that hit a precision target (``decision=precision``): a threshold per acting label on the served
(calibrated; under ``ensemble=blend`` blended) probabilities, the largest coverage whose precision reaches the
label's target, and its worth measured out of fold.

The rule a served row follows: among the acting labels (those with a target) whose probability is at least their
threshold, the most probable one; when there is none, the fallback label, and the row is marked abstained. A label
whose target no threshold reaches on val has no threshold and never acts.

A threshold is chosen on one label's one-vs-rest precision curve (scikit-learn's ``precision_recall_curve``): of the
thresholds whose precision reaches the target with at least ``min_rows`` rows acting, the lowest, which acts on the
most rows. Thresholds above 1/2 can never both be cleared, so the labels cannot compete; below that the more
probable one acts, which the out-of-fold numbers include, since they apply the whole rule.

Measured honestly: the val split is cut into k folds (``ensemble.folds``); for each, the calibration (temperature,
blend weight) and the thresholds are fit on the other k-1 folds and the held-out fold is decided with them. The
exported thresholds are then chosen on the whole val split, on the probabilities the export serves.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from sklearn.metrics import precision_recall_curve

from loralab.metrics import classification_metrics, evaluate_gates

log = logging.getLogger(__name__)

RULE = (
    "among the labels with a target whose probability >= their threshold, the most probable; none: the fallback "
    "(abstained)"
)
STATS = ("precision", "recall", "coverage")
EPS = 1e-12  # a precision of exactly the target (3/5 = 0.6) reaches it despite float rounding


def curve(probs: np.ndarray, y: Sequence[int], label: int) -> dict[str, np.ndarray]:
    """One label's one-vs-rest precision against coverage: per candidate threshold (each distinct probability,
    ascending), the precision, the share of rows acting (p >= threshold) and how many act."""
    p, hit = np.asarray(probs, np.float64)[:, label], np.asarray(y) == label
    if not hit.any():  # precision_recall_curve needs a positive row; no row of the label: never precise
        thresholds = np.unique(p)
        precision = np.zeros(len(thresholds))
    else:
        precision, _, thresholds = precision_recall_curve(hit, p)
        precision = precision[:-1]  # the last point (recall 0) has no threshold
    acting = len(p) - np.searchsorted(np.sort(p), thresholds, side="left")
    return {"threshold": thresholds, "precision": precision, "coverage": acting / len(p), "rows": acting}


def choose_threshold(
    probs: np.ndarray, y: Sequence[int], label: int, target: float, min_rows: int = 1
) -> tuple[float | None, dict[str, Any]]:
    """The lowest threshold whose one-vs-rest precision reaches ``target`` with at least ``min_rows`` rows acting
    (the most coverage; placed halfway to the next lower probability), or None when none does; with what the curve
    offers at best (``best_precision`` among the thresholds acting on ``min_rows`` rows or more)."""
    c = curve(probs, y, label)
    enough = c["rows"] >= min_rows
    ok = np.flatnonzero(enough & (c["precision"] >= target - EPS))
    best = float(c["precision"][enough].max()) if enough.any() else None
    info: dict[str, Any] = {"reachable": bool(len(ok)), "best_precision": best}
    if not len(ok):
        return None, info
    i = ok[0]
    info.update(precision=float(c["precision"][i]), coverage=float(c["coverage"][i]))
    # Halfway down to the next lower val probability: the same rows act on val, and a row served a hair below the
    # one it was chosen at (float32 logits in other batches) is decided alike.
    below = c["threshold"][i - 1] if i > 0 else 0.0
    return float((c["threshold"][i] + below) / 2), info


def choose_thresholds(
    probs: np.ndarray, y: Sequence[int], targets: Mapping[int, float], min_rows: int = 1
) -> tuple[dict[int, float | None], dict[int, dict[str, Any]]]:
    """``choose_threshold`` for each acting label (index -> target); returns thresholds and what each curve said."""
    chosen = {label: choose_threshold(probs, y, label, target, min_rows) for label, target in targets.items()}
    return {k: t for k, (t, _) in chosen.items()}, {k: info for k, (_, info) in chosen.items()}


def decide(probs: np.ndarray, thresholds: Mapping[int, float | None], fallback: int) -> tuple[np.ndarray, np.ndarray]:
    """The rule: per row, the most probable label among those whose probability >= their threshold (labels
    without one never act), else ``fallback``. Returns the decided label indices and whether each row abstained."""
    probs = np.asarray(probs, np.float64)
    bar = np.full(probs.shape[1], np.inf)
    for label, t in thresholds.items():
        if t is not None:
            bar[label] = t
    clears = probs >= bar
    acts = clears.any(axis=1)
    best = np.where(clears, probs, -np.inf).argmax(axis=1)  # ties: the first label, as argmax
    return np.where(acts, best, fallback), ~acts


def stats(decided: np.ndarray, y: Sequence[int], labels: Sequence[int]) -> dict[int, dict[str, float | None]]:
    """Per acting label: precision (None when it never acted), recall and coverage (share of rows it acted on)."""
    decided, y = np.asarray(decided), np.asarray(y)
    out = {}
    for label in labels:
        acted, true = decided == label, y == label
        out[label] = {
            "precision": float((y[acted] == label).mean()) if acted.any() else None,
            "recall": float((acted & true).sum() / true.sum()) if true.any() else None,
            "coverage": float(acted.mean()),
            "rows": int(acted.sum()),
        }
    return out


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, std, min and max of the folds' values that exist (a fold where a label never acted has no precision);
    ``folds``: how many had one."""
    v = np.array([x for x in values if x is not None], np.float64)
    if not len(v):
        return {"mean": None, "std": None, "min": None, "max": None, "folds": 0}
    return {
        "mean": float(v.mean()),
        "std": float(v.std()),
        "min": float(v.min()),
        "max": float(v.max()),
        "folds": len(v),
    }


def cross_fit(
    probs_for: Callable[[int, np.ndarray], np.ndarray],
    y: Sequence[int],
    fold_rows: Sequence[np.ndarray],
    targets: Mapping[int, float],
    fallback: int,
    min_rows: int = 1,
) -> dict[str, Any]:
    """Out-of-fold worth of the thresholds: for each held-out fold, ``probs_for(fold, fit_rows)`` gives every row's
    probabilities with the calibration fit on ``fit_rows`` (the other folds' rows) only, the thresholds are chosen
    on those rows, and the held-out rows are decided with them. Returns per fold the thresholds and stats, and the
    pooled out-of-fold decisions (``decided``: each val row's, by its fold, in row order) with their stats and
    argmax's (``argmax``)."""
    y = np.asarray(y)
    decided, argmax = np.zeros(len(y), int), np.zeros(len(y), int)
    per_fold = []
    for fold, held_out in enumerate(fold_rows):
        fit = np.setdiff1d(np.arange(len(y)), held_out)
        probs = probs_for(fold, fit)
        thresholds, _ = choose_thresholds(probs[fit], y[fit], targets, min_rows)
        decided[held_out] = decide(probs[held_out], thresholds, fallback)[0]
        argmax[held_out] = probs[held_out].argmax(axis=1)
        per_fold.append({"thresholds": thresholds, "stats": stats(decided[held_out], y[held_out], list(targets))})
    pooled = stats(decided, y, list(targets))
    return {
        "folds": per_fold,
        "decided": decided,
        "argmax": argmax,
        "stats": {
            label: {
                **pooled[label],
                **{f"{k}_folds": spread([f["stats"][label][k] for f in per_fold]) for k in STATS},
                "acted_in_folds": sum(f["thresholds"][label] is not None for f in per_fold),
            }
            for label in targets
        },
    }


def scalars(decided: np.ndarray, y: Sequence[int], names: Sequence[str], acting: Sequence[str], prefix: str):
    """The decided labels scored like argmax's (``<prefix>precision_long``, macro-F1, accuracy: the fallback counts
    as the answer it is), plus each acting label's coverage and the share of rows acting at all."""
    s = classification_metrics(y, decided, list(names), prefix=prefix)["scalars"]
    decided = np.asarray(decided)
    s.update({f"{prefix}coverage_{name}": float((decided == names.index(name)).mean()) for name in acting})
    s[f"{prefix}coverage"] = float(np.isin(decided, [names.index(name) for name in acting]).mean())
    return s


def report(
    probs_for: Callable[[int, np.ndarray], np.ndarray],
    served: np.ndarray,
    y: Sequence[int],
    fold_rows: Sequence[np.ndarray],
    names: Sequence[str],
    targets: Mapping[str, float],
    fallback: str,
    min_rows: int,
    gates: Mapping[str, str],
) -> tuple[dict[str, Any], np.ndarray]:
    """The decision report (JSON): the thresholds to export, chosen on ``served`` (every val row's served
    probabilities), with whether each target was reachable; the out-of-fold stats with their fold spread; the
    out-of-fold decisions scored as ``val_*`` and the gates applied to them. Also returns each val row's
    out-of-fold decision (label index)."""
    names, y = list(names), np.asarray(y)
    index = {name: names.index(name) for name in targets}
    by_index = {index[name]: float(t) for name, t in targets.items()}
    oof = cross_fit(probs_for, y, fold_rows, by_index, names.index(fallback), min_rows)
    thresholds, curves = choose_thresholds(served, y, by_index, min_rows)
    oof_scalars = scalars(oof["decided"], y, names, list(targets), "val_")
    out = {
        "method": "precision",
        "rule": RULE,
        "fallback": fallback,
        "targets": dict(targets),
        "min_rows": min_rows,
        "folds": len(fold_rows),
        "rows": len(y),
        "thresholds": {name: thresholds[i] for name, i in index.items()},
        "val": {name: curves[i] for name, i in index.items()},  # on all of val, where the exported ones come from
        "oof": {name: oof["stats"][i] for name, i in index.items()},
        "fold_thresholds": [{name: f["thresholds"][i] for name, i in index.items()} for f in oof["folds"]],
        "scalars": oof_scalars,
        "argmax_scalars": scalars(oof["argmax"], y, names, list(targets), "val_"),
        "gates": evaluate_gates(oof_scalars, gates),
    }
    for name in targets:
        t, o = out["thresholds"][name], out["oof"][name]
        if t is None:
            log.warning("decision: %s", unreachable_line(name, out))
        else:
            log.info(
                "decision: %s acts at p >= %.4f; out of fold precision %s (folds %s), coverage %.3f",
                name,
                t,
                _num(o["precision"]),
                _range(o["precision_folds"]),
                o["coverage"],
            )
    return out, oof["decided"]


def unreachable_line(name: str, report: Mapping[str, Any]) -> str:
    """The plain sentence for a label whose target no threshold reaches on val."""
    best = report["val"][name]["best_precision"]
    return (
        f"{name} cannot reach precision {report['targets'][name]:.2f} on val (best {_num(best)} with at least "
        f"{report['min_rows']} rows acting), so it never acts: its rows go to {report['fallback']}"
    )


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _range(s: Mapping[str, Any]) -> str:
    return "none acted" if s["folds"] == 0 else f"{s['min']:.3f}-{s['max']:.3f}, std {s['std']:.3f}"


def thresholds_by_index(decision: Mapping[str, Any], names: Sequence[str]) -> tuple[dict[int, float | None], int]:
    """An exported decision (``loralab.json``'s ``decision``) as ``decide`` takes it: thresholds by label index and
    the fallback's index."""
    names = list(names)
    return {names.index(k): v for k, v in decision["thresholds"].items()}, names.index(decision["fallback"])
