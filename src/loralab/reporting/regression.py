"""What a regression run leaves next to its checkpoint: per-epoch history, metadata, and plots to read."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from matplotlib.figure import (
    Figure,  # object API: the Agg canvas, no pyplot global state, no display needed
)

from loralab.config import RunConf
from loralab.fs import atomic_write_json
from loralab.reporting.plots import save_figure
from loralab.reporting.provenance import code_version
from loralab.result import RunResult

log = logging.getLogger(__name__)


def plot_loss_curves(history: Sequence[dict[str, Any]], best_epoch: int, path: Path) -> Path:
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(7, 4.5), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    ax.plot(epochs, [h["val_loss"] for h in history], marker="o", label="val loss")
    ax.axvline(best_epoch, color="grey", linestyle="--", label=f"best epoch ({best_epoch})")
    ax.set(xlabel="epoch", ylabel="loss", title="Loss per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path, dpi=120)


def plot_per_target(
    history: Sequence[dict[str, Any]], names: Sequence[str], best_epoch: int, path: Path, metric: str = "mae"
) -> Path:
    """One line per dimension (a head, for the MLP) of its validation ``metric`` across epochs."""
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(7, 4.5), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    for name in names:
        ax.plot(epochs, [h[f"val_{metric}_{name}"] for h in history], marker="o", label=name)
    ax.axvline(best_epoch, color="grey", linestyle="--", label=f"best epoch ({best_epoch})")
    ax.set(xlabel="epoch", ylabel=f"validation {metric.upper()}", title=f"Validation {metric.upper()} per dimension")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return save_figure(fig, path, dpi=120)


def write_plots(history: Sequence[dict[str, Any]], names: Sequence[str], best_epoch: int, out_dir: Path) -> list[Path]:
    """``plots/loss_curves.png`` and ``plots/per_dimension_mae.png``."""
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    paths = [
        plot_loss_curves(history, best_epoch, plots / "loss_curves.png"),
        plot_per_target(history, names, best_epoch, plots / "per_dimension_mae.png"),
    ]
    log.info("plots: %s", ", ".join(str(p) for p in paths))
    return paths


def write_regression_report(
    conf: RunConf,
    out_dir: Path,
    tracker,
    result: RunResult,
    names: Sequence[str],
    data_info: dict[str, Any],
    test: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Write ``training_history.json``, ``training_metadata.json``, ``metrics.json`` and the plots; log ``best.*``
    (and ``test_*``, the test split's scores, when given); return the metrics and files for the summary."""
    best_epoch, history = result.best_epoch, result.history
    best = result.best  # the best evaluation: an epoch end or a val check
    atomic_write_json(out_dir / "training_history.json", history)
    test = test or {}
    atomic_write_json(out_dir / "metrics.json", {"best_epoch": best_epoch, **best, **test})
    metadata = {
        "task": conf.task.name,
        "config": conf.as_dict(),
        "data": data_info,
        "target_names": list(names),
        "best_epoch": best_epoch,
        "best_metrics": best,
        "monitor": conf.trainer.monitor,
        "monitor_mode": conf.trainer.monitor_mode,
        **{
            k: getattr(result, k)
            for k in ("stop_reason", "epochs_run", "wall_time_s", "fit_time_s", "train_samples_per_s", "device")
        },
        **code_version(result.provenance),
    }
    atomic_write_json(out_dir / "training_metadata.json", metadata)
    write_plots(history, names, best_epoch, out_dir)
    tracker.log_metrics({f"best.{k}": v for k, v in best.items() if k.startswith("val_")}, step=best_epoch)
    tracker.log_metrics(test, step=best_epoch)
    files = [out_dir / n for n in ("training_history.json", "training_metadata.json", "metrics.json")]
    metrics = {k: v for k, v in {**best, **test}.items() if k.startswith(("val_", "test_"))}
    return {"metrics": {**metrics, "gates": {}}, "artifacts": [*files, out_dir / "plots"]}
