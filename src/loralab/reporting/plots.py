"""The run's plots, as PNG files under ``<run_dir>/plots/``.

Figures are built with matplotlib's object API on the Agg canvas (no pyplot state, no display needed), so plotting
is safe in sweeps and in worker processes. Every function takes plain data and a path and returns the path.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import ConfusionMatrixDisplay

from loralab.fs import atomic_path

log = logging.getLogger(__name__)

DPI = 110
SPLIT_NAMES = {
    "train_before_oversampling": "train (before oversampling)",
    "train_after_oversampling": "train (after oversampling)",
    "val": "val",
}


# Past this many classes the plots turn compact: no per-cell numbers or per-bar counts (tens of thousands of text
# artists take minutes to draw and cannot be read), and the F1 curves show the classes doing worst.
MANY_CLASSES = 30


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = DPI) -> Path:
    """Atomically, so a crash or a concurrent reader never meets half a PNG; the format comes from ``path``'s
    suffix, which the temp file's name would not give matplotlib."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or None, dpi=dpi)
    return path


def _mark_best(ax, best_epoch: int | None) -> None:
    if best_epoch:
        ax.axvline(best_epoch, color="grey", linestyle=":", linewidth=1, label=f"best epoch ({best_epoch})")


def _epoch_axis(ax, epochs: Sequence[int]) -> None:
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs: a 2-epoch run shows no 1.25, 1.5 ...
    if len(epochs) == 1:
        ax.set_xlim(epochs[0] - 0.5, epochs[0] + 0.5)
    ax.grid(alpha=0.3)


def loss_curves(history: Sequence[Mapping[str, float]], path: Path, best_epoch: int | None = None) -> Path:
    """Train and val loss per epoch: diverging curves are overfitting, flat ones a learning rate problem."""
    epochs = [h["epoch"] for h in history]
    fig = _figure(6.4, 4)
    ax = fig.add_subplot()
    ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    ax.plot(epochs, [h["val_loss"] for h in history], marker="s", label="val loss")
    _mark_best(ax, best_epoch)
    _epoch_axis(ax, epochs)
    ax.set_ylabel("loss (training objective)")
    ax.set_title("Loss per epoch")
    ax.legend()
    return save_figure(fig, path)


def f1_curves(
    history: Sequence[Mapping[str, float]],
    labels: Sequence[str],
    path: Path,
    best_epoch: int | None = None,
    baseline_macro_f1: float | None = None,
) -> Path:
    """Val macro-F1 (bold) and each class's F1 per epoch, with the baseline's macro-F1 as a reference line."""
    epochs = [h["epoch"] for h in history]
    fig = _figure(8, 4)
    ax = fig.add_subplot()
    ax.plot(epochs, [h["val_macro_f1"] for h in history], marker="o", linewidth=2.5, color="black", label="macro-F1")
    shown = [lb for lb in labels if all(f"val_f1_{lb}" in h for h in history)]  # absent: no val rows of the class
    if len(shown) > MANY_CLASSES:  # the ones to watch: lowest F1 at the last epoch
        shown = sorted(shown, key=lambda lb: history[-1][f"val_f1_{lb}"])[: MANY_CLASSES // 3]
        ax.set_title(f"Validation F1 per epoch ({len(shown)} lowest of {len(labels)} classes)")
    for label in shown:
        ax.plot(epochs, [h[f"val_f1_{label}"] for h in history], marker=".", linestyle="--", label=f"F1 {label}")
    if baseline_macro_f1 is not None:
        ax.axhline(
            baseline_macro_f1,
            color="tab:red",
            linestyle="-.",
            linewidth=1.2,
            label=f"baseline macro-F1 ({baseline_macro_f1:.2f})",
        )
    _mark_best(ax, best_epoch)
    _epoch_axis(ax, epochs)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("F1 on val")
    if not ax.get_title():
        ax.set_title("Validation F1 per epoch")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: lines stay visible
    return save_figure(fig, path)


def confusion_matrices(
    matrix: Sequence[Sequence[int]],
    labels: Sequence[str],
    path: Path,
    title: str = "Confusion matrix (val, best epoch)",
) -> Path:
    """Counts and row-normalised (share of each true class) side by side; rows are true, columns predicted."""
    counts = np.asarray(matrix, dtype=int)
    row_sums = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, row_sums, out=np.zeros(counts.shape), where=row_sums > 0)
    fig = _figure(11, 4.6)
    ax_counts, ax_share = fig.subplots(1, 2)
    few = len(labels) <= MANY_CLASSES
    ConfusionMatrixDisplay(counts, display_labels=list(labels)).plot(
        ax=ax_counts, cmap="Blues", values_format="d", colorbar=True, include_values=few
    )
    ax_counts.set_title("counts")
    disp = ConfusionMatrixDisplay(share, display_labels=list(labels))
    disp.plot(ax=ax_share, cmap="Blues", values_format=".2f", colorbar=True, include_values=few)
    if not few:  # unreadable tick labels cost as much as cell numbers
        for ax in (ax_counts, ax_share):
            ax.set_xticks([])
            ax.set_yticks([])
    disp.im_.set_clim(0, 1)
    ax_share.set_title("row-normalised (recall per true class)")
    fig.suptitle(title)
    return save_figure(fig, path)


def class_distribution(class_counts: Mapping[str, Mapping[str, int]], path: Path) -> Path:
    """Rows per class in each split (train before/after oversampling, val) as grouped bars with counts."""
    splits = [s for s in SPLIT_NAMES if s in class_counts] + [s for s in class_counts if s not in SPLIT_NAMES]
    labels = list(next(iter(class_counts.values())))
    x = np.arange(len(labels))
    width = 0.8 / len(splits)
    fig = _figure(6.4, 4.4)
    ax = fig.add_subplot()
    for i, split in enumerate(splits):
        bars = ax.bar(
            x + (i - (len(splits) - 1) / 2) * width,
            [class_counts[split][lb] for lb in labels],
            width,
            label=SPLIT_NAMES.get(split, split),
        )
        if len(labels) <= MANY_CLASSES:
            ax.bar_label(bars, fontsize="x-small", padding=1)
    ax.set_xticks(x, labels if len(labels) <= MANY_CLASSES else [""] * len(labels))
    ax.set_xlabel("class")
    ax.set_ylabel("rows")
    ax.margins(y=0.12)  # room for the count labels
    ax.set_title("Class distribution per split")
    fig.legend(loc="outside lower center", ncols=len(splits), fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def make_plots(
    plot_dir: Path,
    history: Sequence[Mapping[str, Any]],
    metrics: Mapping[str, Any],
    class_counts: Mapping[str, Mapping[str, int]] | None,
    labels: Sequence[str],
) -> dict[str, Path]:
    """All of a run's plots; ``metrics`` is metrics.json's content (best epoch, confusion matrix, baseline).

    A plot whose data the run does not have (no F1 or confusion matrix in a regression run) is left out.
    """
    t0 = time.perf_counter()
    plot_dir = Path(plot_dir)
    best = metrics.get("best_epoch")
    baseline = metrics.get("baseline") or {}
    has = {key for h in history[:1] for key in h}
    plots = {}
    if {"train_loss", "val_loss"} <= has:
        plots["loss_curves"] = loss_curves(history, plot_dir / "loss_curves.png", best)
    if "val_macro_f1" in has:
        plots["f1_curves"] = f1_curves(
            history, labels, plot_dir / "f1_curves.png", best, baseline.get("scalars", {}).get("val_macro_f1")
        )
    if metrics.get("confusion_matrix"):
        plots["confusion_matrix"] = confusion_matrices(
            metrics["confusion_matrix"]["matrix"], labels, plot_dir / "confusion_matrix.png"
        )
    if class_counts:
        plots["class_distribution"] = class_distribution(class_counts, plot_dir / "class_distribution.png")
    if baseline.get("confusion_matrix"):
        plots["baseline_confusion_matrix"] = confusion_matrices(
            baseline["confusion_matrix"]["matrix"],
            labels,
            plot_dir / "baseline_confusion_matrix.png",
            title=f"Baseline ({baseline['name']}) confusion matrix (val)",
        )
    log.info("wrote %d plots to %s in %.2f s", len(plots), plot_dir, time.perf_counter() - t0)
    return plots


def precision_coverage(
    curves: Mapping[str, Mapping[str, Sequence[float]]],
    targets: Mapping[str, float],
    chosen: Mapping[str, Mapping[str, Any]],
    path: Path,
    title: str = "Precision against coverage (val)",
) -> Path:
    """One panel per acting label: its precision against its coverage (share of rows acting) as the threshold falls,
    the target as a line, the chosen threshold as a dot, the out-of-fold result with its fold range, and argmax."""
    fig = _figure(5.2 * len(curves), 4.4)
    axes = np.atleast_1d(fig.subplots(1, len(curves), squeeze=False)[0])
    for ax, (name, c) in zip(axes, curves.items()):
        mark = chosen[name]
        ax.plot(c["coverage"], c["precision"], color="tab:blue", linewidth=1.4, label="val, by threshold")
        ax.axhline(targets[name], color="tab:red", linestyle="--", linewidth=1.2, label=f"target {targets[name]:.2f}")
        if mark.get("threshold") is not None:
            ax.plot(
                mark["coverage"],
                mark["precision"],
                "o",
                color="black",
                markersize=8,
                label=f"chosen p >= {mark['threshold']:.3f}",
            )
        else:
            ax.text(0.5, 0.06, "target unreachable: never acts", transform=ax.transAxes, ha="center", color="tab:red")
        if mark.get("oof_precision") is not None:
            lo, hi = mark["oof_range"]
            ax.errorbar(
                [mark["oof_coverage"]],
                [mark["oof_precision"]],
                yerr=[[mark["oof_precision"] - lo], [hi - mark["oof_precision"]]],
                fmt="s",
                color="tab:green",
                capsize=4,
                label="out of fold (fold min-max)",
            )
        if mark.get("argmax_precision") is not None:
            ax.plot(mark["argmax_coverage"], mark["argmax_precision"], "^", color="grey", label="argmax")
        ax.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="coverage (share of rows acting)", ylabel="precision")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="lower left")
    fig.suptitle(title)
    return save_figure(fig, path)
