"""Compare runs: the rows of ``reporting.runs`` as tables (terminal, markdown, CSV) and a heatmap of a two-key grid.

The end-of-sweep summary (CSV, markdown, heatmap on the parent run) and ``loralab-compare`` (``loralab.cli.compare``)
render the same rows, so the terminal and the MLflow artifact never disagree.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from loralab.fs import atomic_path, atomic_write_text
from loralab.reporting.runs import BESIDE

FOLD_KEY = "data.fold"  # a sweep over it (walk-forward folds) is summarised per setting too


def swept_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Override keys whose value differs between rows, in first-seen order."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row["override_values"] if k not in keys]
    return [k for k in keys if len({row["override_values"].get(k) for row in rows}) > 1]


def beside_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The ``BESIDE`` columns at least one row has (a sweep without ``ensemble=blend`` shows no blend columns)."""
    return [name for name in BESIDE if any(name in row["beside"] for row in rows)]


def columns(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and text cells shared by the markdown and terminal tables."""
    keys = swept_keys(rows) or ["overrides"]
    labels = sorted({label for row in rows for label in row["f1"]})
    objective = rows[0]["objective_key"] if rows else "objective"
    beside = beside_columns(rows)
    header = ["job", *keys, "status", objective, *(f"f1_{label}" for label in labels), *beside, "error"]
    cells = []
    for row in rows:
        values = row["override_values"] if keys != ["overrides"] else {"overrides": row["overrides"]}
        cells.append(
            [
                "" if row["job"] is None else str(row["job"]),
                *(short_value(values.get(k, "")) for k in keys),
                row["status"],
                _num(row["objective"]),
                *(_num(row["f1"].get(label)) for label in labels),
                *(_num(row["beside"].get(name)) for name in beside),
                row["error"][:120],
            ]
        )
    return header, cells


def fold_settings(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Where the jobs differ in ``data.fold``: one row per setting (every other override equal) with the mean,
    standard deviation (population, as scikit-learn's cross-validation reports it) and worst fold of the
    objective over its finished folds, best mean first; [] for any other sweep."""
    if FOLD_KEY not in swept_keys(rows):
        return []
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        setting = tuple((k, v) for k, v in row["override_values"].items() if k != FOLD_KEY)
        groups.setdefault(tuple(sorted(setting)), []).append(row)
    out = []
    for setting, members in groups.items():
        done = [r for r in members if r["status"] == "FINISHED" and not math.isnan(r["objective"])]
        values = np.array([r["objective"] for r in done])
        lower = members[0]["mode"] == "min"
        out.append(
            {
                "setting": dict(setting),
                "objective_key": members[0]["objective_key"],
                "mode": members[0]["mode"],
                "folds": sorted((r["override_values"].get(FOLD_KEY, "") for r in done), key=_as_number),
                "failed": len(members) - len(done),
                "mean": float(values.mean()) if len(done) else math.nan,
                "std": float(values.std()) if len(done) else math.nan,
                "worst": float(values.max() if lower else values.min()) if len(done) else math.nan,
            }
        )
    return sorted(
        out,
        key=lambda s: (
            math.isnan(s["mean"]),
            0.0 if math.isnan(s["mean"]) else s["mean"] * (1 if s["mode"] == "min" else -1),
        ),
    )


def _as_number(value: str) -> tuple[float, str]:
    try:
        return float(value), value
    except ValueError:
        return math.inf, value


def setting_columns(settings: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and text cells of the per-setting table (markdown, terminal and CSV alike)."""
    keys = [
        k
        for k in dict.fromkeys(k for s in settings for k in s["setting"])
        if len({s["setting"].get(k) for s in settings}) > 1
    ]
    objective = settings[0]["objective_key"] if settings else "objective"
    header = [*(keys or ["setting"]), "folds", f"mean {objective}", "std", "worst", "failed"]
    cells = [
        [
            *((short_value(s["setting"].get(k, "")) for k in keys) if keys else ["(all folds)"]),
            " ".join(s["folds"]),
            _num(s["mean"]),
            _num(s["std"]),
            _num(s["worst"]),
            str(s["failed"]),
        ]
        for s in settings
    ]
    return header, cells


def short_value(value: str) -> str:
    """Sampled floats (Optuna) to 4 significant digits for reading; the CSV keeps them whole."""
    try:
        return f"{float(value):.4g}" if len(value) > 8 else value
    except ValueError:
        return value


def _num(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.4f}"


def _markdown_table(header: Sequence[str], cells: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in cells]


def to_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The jobs' table; after it, for a sweep over ``data.fold``, the per-setting table."""
    lines = _markdown_table(*columns(rows))
    settings = fold_settings(rows)
    if settings:
        lines += [
            "",
            f"Per setting over {FOLD_KEY} (best mean first):",
            "",
            *_markdown_table(*setting_columns(settings)),
        ]
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    keys = swept_keys(rows)
    labels = sorted({label for row in rows for label in row["f1"]})
    beside = beside_columns(rows)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "job",
                "run_id",
                "status",
                *keys,
                "objective_key",
                "objective",
                *(f"f1_{label}" for label in labels),
                *beside,
                "overrides",
                "error",
            ]
        )
        for row in rows:
            w.writerow(
                [
                    row["job"],
                    row["run_id"],
                    row["status"],
                    *(row["override_values"].get(k, "") for k in keys),
                    row["objective_key"],
                    row["objective"],
                    *(row["f1"].get(label, "") for label in labels),
                    *(row["beside"].get(name, "") for name in beside),
                    row["overrides"],
                    row["error"],
                ]
            )
    return path


def heatmap(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Objective over the two swept keys (gamma × rank for the gamma_rank grid); None unless exactly two numeric
    keys vary over a full grid (an Optuna search samples points, not a grid). Failed jobs are marked cells."""
    keys = swept_keys(rows)
    if len(keys) != 2:
        return None
    try:
        points = {tuple(float(row["override_values"][k]) for k in keys) for row in rows}
    except (KeyError, ValueError):
        return None
    axes = [sorted({p[n] for p in points}) for n in range(2)]
    if len(points) != len(axes[0]) * len(axes[1]):
        return None
    from matplotlib.figure import Figure  # object API: no pyplot state, no display backend

    from loralab.reporting.plots import save_figure  # matplotlib loads only when there is a heatmap to draw

    grid = [[math.nan] * len(axes[1]) for _ in axes[0]]
    for row in rows:
        i, j = (axes[n].index(float(row["override_values"][k])) for n, k in enumerate(keys))
        grid[i][j] = row["objective"]
    fig = Figure(figsize=(1.2 * len(axes[1]) + 2.5, 0.9 * len(axes[0]) + 1.8))
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label=rows[0]["objective_key"])
    ax.set_xticks(range(len(axes[1])), [f"{v:g}" for v in axes[1]])
    ax.set_yticks(range(len(axes[0])), [f"{v:g}" for v in axes[0]])
    ax.set_xlabel(keys[1])
    ax.set_ylabel(keys[0])
    for i, line in enumerate(grid):
        for j, value in enumerate(line):
            failed = math.isnan(value)
            color = "crimson" if failed else ("k" if image.norm(value) > 0.6 else "w")  # readable on any cell
            ax.text(j, i, "failed" if failed else f"{value:.3f}", ha="center", va="center", color=color)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def write_settings_csv(settings: Sequence[dict[str, Any]], path: Path) -> Path:
    keys = list(dict.fromkeys(k for s in settings for k in s["setting"]))
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*keys, "objective_key", "folds", "mean", "std", "worst", "failed"])
        for s in settings:
            w.writerow(
                [
                    *(s["setting"].get(k, "") for k in keys),
                    s["objective_key"],
                    " ".join(s["folds"]),
                    s["mean"],
                    s["std"],
                    s["worst"],
                    s["failed"],
                ]
            )
    return path


def write_summary(rows: Sequence[dict[str, Any]], out_dir: Path, name: str = "sweep_summary") -> list[Path]:
    """CSV + markdown table (+ heatmap PNG when two numeric keys were swept; + the per-setting CSV of a sweep
    over ``data.fold``) into ``out_dir``."""
    out_dir = Path(out_dir)
    paths = [write_csv(rows, out_dir / f"{name}.csv"), atomic_write_text(out_dir / f"{name}.md", to_markdown(rows))]
    settings = fold_settings(rows)
    if settings:
        paths.append(write_settings_csv(settings, out_dir / f"{name}_by_setting.csv"))
    png = heatmap(rows, out_dir / f"{name}_heatmap.png")
    return paths + ([png] if png else [])


def print_table(rows: Sequence[dict[str, Any]], title: str, console: Console | None = None) -> None:
    """The jobs' table; after it, for a sweep over ``data.fold``, the per-setting table."""
    console = console or Console()
    _print(columns(rows), [row["status"] == "FINISHED" for row in rows], title, console)
    settings = fold_settings(rows)
    if settings:
        ok = [s["failed"] == 0 for s in settings]
        _print(setting_columns(settings), ok, f"per setting over {FOLD_KEY}, best mean first", console)


def _print(table_cells: tuple[list[str], list[list[str]]], ok: Sequence[bool], title: str, console: Console) -> None:
    header, cells = table_cells
    table = Table(title=title)
    for name in header:
        free = name in ("error", "overrides")
        # values never wrap or shrink; the free-text columns fold into what width is left
        table.add_column(
            name,
            justify="left" if free or name == "status" else "right",
            no_wrap=not free,
            min_width=None if free else max(len(name), 8 if name == "status" else 0),
            overflow="fold",
        )
    for line, fine in zip(cells, ok):
        table.add_row(*line, style=None if fine else "red")
    need = console.measure(table, options=console.options.update_width(10_000))
    if need.minimum > console.width:  # a narrow terminal gets long lines rather than numbers cut off
        console = Console(width=max(need.minimum, min(need.maximum, 160)), file=console.file)
    console.print(table)
