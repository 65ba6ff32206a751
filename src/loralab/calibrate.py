"""Temperature scaling and the numbers it is judged by: NLL, top-label ECE and Brier, plus a reliability diagram.

Temperature scaling (Guo et al., 2017) divides every logit by one scalar T fit on held-out logits. It never changes
the argmax, so accuracy and F1 stay put; only the confidence moves. T > 1 softens an over-confident model.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn.metrics import brier_score_loss, log_loss

from loralab.fs import atomic_path

log = logging.getLogger(__name__)

METHODS = ("temperature", "none")


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / T) in float64 (float32 softmax of large logits rounds tail probabilities to 0)."""
    return softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=-1)


def nll(probs: np.ndarray, y: Sequence[int]) -> float:
    """Mean negative log-likelihood of the true class (sklearn's ``log_loss``)."""
    return float(log_loss(y, probs, labels=list(range(probs.shape[1]))))


def brier(probs: np.ndarray, y: Sequence[int]) -> float:
    """Multiclass Brier score: mean over rows of the squared distance to the one-hot target, summed over classes
    (``scale_by_half=False`` so two and three classes use the same definition)."""
    return float(brier_score_loss(y, probs, labels=list(range(probs.shape[1])), scale_by_half=False))


def bin_stats(probs: np.ndarray, y: Sequence[int], n_bins: int = 15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width confidence bin (i/n, (i+1)/n]: row count, accuracy and mean confidence (NaN when empty).

    Confidence is the top-label probability and a row is correct when its argmax is the true class.
    """
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == np.asarray(y)).astype(np.float64)
    idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)  # right-closed bins
    counts = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(idx, weights=correct, minlength=n_bins) / counts
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / counts
    return counts, acc, mean_conf


def ece(probs: np.ndarray, y: Sequence[int], n_bins: int = 15) -> float:
    """Top-label expected calibration error: sum over bins of (rows in bin / rows) * |accuracy - confidence|."""
    counts, acc, conf = bin_stats(probs, y, n_bins)
    filled = counts > 0
    return float(np.sum(counts[filled] / counts.sum() * np.abs(acc[filled] - conf[filled])))


def calibration_metrics(probs: np.ndarray, y: Sequence[int], n_bins: int = 15) -> dict[str, float]:
    return {"nll": nll(probs, y), "ece": ece(probs, y, n_bins), "brier": brier(probs, y)}


def fit_temperature(logits: np.ndarray, y: Sequence[int], bounds: Sequence[float] = (0.05, 20.0)) -> float:
    """T minimising the NLL of softmax(logits / T), searched over log T (scale-free, keeps T > 0)."""
    z = np.asarray(logits, dtype=np.float64)
    rows, y = np.arange(len(z)), np.asarray(y)

    def mean_nll(log_t: float) -> float:
        return float(-log_softmax(z / math.exp(log_t), axis=1)[rows, y].mean())

    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    res = minimize_scalar(mean_nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
    temperature = math.exp(res.x)
    if min(res.x - lo, hi - res.x) < 1e-3:
        log.warning(
            "temperature %.4g is at the edge of calibration.t_bounds=%s; widen the bounds", temperature, list(bounds)
        )
    return temperature


def calibrate(
    logits: np.ndarray,
    y: Sequence[int],
    method: str = "temperature",
    n_bins: int = 15,
    t_bounds: Sequence[float] = (0.05, 20.0),
) -> dict:
    """Fit (or skip) temperature scaling; return T and NLL/ECE/Brier before and after as flat ``val_*`` scalars."""
    if method not in METHODS:
        raise ValueError(f"calibration.method={method!r}: must be one of {list(METHODS)}")
    temperature = fit_temperature(logits, y, t_bounds) if method == "temperature" else 1.0
    before = calibration_metrics(probabilities(logits), y, n_bins)
    after = calibration_metrics(probabilities(logits, temperature), y, n_bins)
    scalars = {"temperature": temperature, **{f"val_{k}": v for k, v in before.items()}}
    if method != "none":
        scalars.update({f"val_{k}_calibrated": v for k, v in after.items()})
    log.info(
        "calibration (%s, T=%.4f): NLL %.4f -> %.4f, ECE %.4f -> %.4f, Brier %.4f -> %.4f",
        method,
        temperature,
        before["nll"],
        after["nll"],
        before["ece"],
        after["ece"],
        before["brier"],
        after["brier"],
    )
    return {"method": method, "temperature": temperature, "n_bins": n_bins, "scalars": scalars}


def reliability_figure(
    y: Sequence[int], curves: dict[str, np.ndarray], n_bins: int = 15, title: str = "Reliability diagram"
):
    """Accuracy against confidence per bin for each named probability matrix, with the diagonal of perfect
    calibration; ECE in the legend, rows per bin underneath. A bare ``Figure`` on the Agg canvas: no pyplot state,
    no display needed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 7))
    FigureCanvasAgg(fig)
    ax, ax_hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    edges = np.linspace(0, 1, n_bins + 1)
    width = 1.0 / n_bins / (len(curves) + 1)
    for i, (name, probs) in enumerate(curves.items()):
        counts, acc, conf = bin_stats(probs, y, n_bins)
        filled = counts > 0
        ax.plot(conf[filled], acc[filled], marker="o", label=f"{name} (ECE {ece(probs, y, n_bins):.3f})")
        ax_hist.bar(edges[:-1] + (i + 0.5) * width, counts, width=width, label=name)
    ax.set(title=title, ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left")
    ax_hist.set(xlabel="confidence (top-label probability)", ylabel="rows")
    ax_hist.legend(loc="upper left")
    fig.tight_layout()
    return fig


def reliability_diagram(
    y: Sequence[int],
    curves: dict[str, np.ndarray],
    path: str | Path,
    n_bins: int = 15,
    title: str = "Reliability diagram",
) -> Path:
    """Save ``reliability_figure`` as a PNG."""
    with atomic_path(path) as tmp:  # the temp name has no .png for matplotlib to read the format from
        reliability_figure(y, curves, n_bins, title).savefig(tmp, format="png", dpi=120)
    return Path(path)
