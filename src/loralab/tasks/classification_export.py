"""After a classification run: the best epoch's full report (per-class table, confusion matrix, gates,
calibration, baseline) and the verified export (merged, adapter, ``loralab.json``, ``model_final.zip``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loralab.archive import zip_dir
from loralab.baseline import predict_proba
from loralab.calibrate import calibrate, calibration_metrics, probabilities, reliability_diagram
from loralab.config.tasks import ClassificationConf
from loralab.core.checkpoint import save_checkpoint
from loralab.core.trainer import predict_logits
from loralab.data.records import write_rows
from loralab.data.serialize import Json, Serializer
from loralab.data.timeorder import Gap, purged_folds
from loralab.ensemble import (
    BASELINE_FILE,
    blend,
    calibrated_baseline,
    cross_fit,
    folds,
    load_baseline,
    save_baseline,
    scores,
)
from loralab.errors import ExportError
from loralab.export import export_model
from loralab.fs import atomic_dir, atomic_write_json, sha256_file
from loralab.metrics import classification_metrics, evaluate_gates
from loralab.reporting.provenance import code_version
from loralab.result import RunResult
from loralab.tasks.base import RunContext
from loralab.tasks.classification_decisions import fold_probabilities, test_decisions, val_decisions

log = logging.getLogger(__name__)

CALIBRATION_KEYS = ("val_nll", "val_ece", "val_brier", "temperature")


def best_epoch_report(
    conf: ClassificationConf,
    model,
    val_loader,
    result: RunResult,
    ctx: RunContext,
    baseline: dict[str, Any] | None,
    blend_inputs: tuple[np.ndarray, list] | None = None,
    val_rows: list | None = None,
    gap: Gap | None = None,
) -> dict[str, Any]:
    """Everything about the best epoch into ``metrics.json`` and MLflow (``best.*``); with ``blend_inputs`` (the
    baseline's val probabilities and the val records, in the loader's order) the ensemble's report too; with
    ``decision=precision`` the decision report (``val_rows``: the val records in the loader's order). When val is
    time-ordered (``gap``), both cross-fit on contiguous time blocks, the blend's fits purged and embargoed."""
    labels, best_epoch = list(conf.data.labels), result.best_epoch
    logits, y = predict_logits(model, val_loader, ctx.device, conf.hardware.precision)
    report = classification_metrics(y, logits.argmax(-1), labels)
    gates = evaluate_gates(report["scalars"], conf.trainer.gates or {})
    c = conf.calibration
    calib = calibrate(logits, y, c.method, c.n_bins, list(c.t_bounds))
    curves = {"uncalibrated": probabilities(logits)}
    if c.method != "none":
        curves[f"T = {calib['temperature']:.3f}"] = probabilities(logits, calib["temperature"])
    plot = reliability_diagram(
        y,
        curves,
        ctx.out_dir / "plots" / "reliability_diagram.png",
        c.n_bins,
        title=f"Reliability diagram: validation, best epoch {best_epoch}",
    )
    best = result.best  # the best evaluation: an epoch end or a val check
    metrics = {
        "best_epoch": best_epoch,
        **report["scalars"],
        "val_loss": best["val_loss"],
        **calib.pop("scalars"),
        "per_class": report["per_class"],
        "confusion_matrix": report["confusion_matrix"],
        "gates": gates,
        "calibration": {**calib, "fit_on": "val", "plot": str(plot)},
        "baseline": baseline,
    }
    # One set of val folds for the blend's cross-fit and the decisions' (decision.folds = ensemble.folds).
    k = conf.ensemble.folds if conf.ensemble is not None else conf.decision.folds if conf.decision else 0
    fold_rows, fit_rows, purged = None, None, None
    if k:
        times = [r.time for r in val_rows] if gap is not None and val_rows else None
        fold_rows = folds(y, k, conf.seed, order=times)
        if times is not None and gap is not None:
            fit_rows, purged = purged_folds(times, fold_rows, gap)
    served = probabilities(logits, metrics["temperature"])  # what the export serves for the val rows
    if blend_inputs is not None:
        metrics["ensemble"], served = ensemble_report(
            conf, logits, y, metrics["temperature"], *blend_inputs, ctx, fold_rows=fold_rows, fit_rows=fit_rows
        )
        if purged is not None:
            metrics["ensemble"]["time_folds"] = purged  # rows left out of the folds' fits: purged and embargoed
    if conf.decision is not None:
        base_probs = blend_inputs[0] if blend_inputs is not None else None
        probs_for = fold_probabilities(conf, logits, y, base_probs, metrics.get("ensemble"))
        metrics["decision"] = val_decisions(conf, served, y, probs_for, fold_rows or [], val_rows or [], ctx)
    atomic_write_json(ctx.out_dir / "metrics.json", metrics)
    ctx.tracker.log_metrics({f"best.{k}": v for k, v in {**best, **report["scalars"]}.items()}, step=best_epoch)
    ctx.tracker.log_metrics(calibration_scalars(metrics), step=best_epoch)
    ctx.tracker.log_artifact(plot, "plots")
    ctx.tracker.set_tags({"gates_passed": all(g["passed"] is not False for g in gates.values())})
    return metrics


def ensemble_report(
    conf: ClassificationConf,
    logits: np.ndarray,
    y: np.ndarray,
    temperature: float,
    base_probs: np.ndarray,
    rows: list,
    ctx: RunContext,
    fold_rows: list[np.ndarray] | None = None,
    fit_rows: list[np.ndarray] | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """``ensemble=blend``: the cross-fit report (``ensemble.*`` in MLflow, tag ``ensemble.choice``) and
    ``ensemble_val.jsonl``: per val row the model's (calibrated), the baseline's (as it predicts them, before its
    temperature) and the exported blend's probabilities; returns the report and the blend's val probabilities."""
    e, labels = conf.ensemble, list(conf.data.labels)
    report, blended = cross_fit(
        logits,
        base_probs,
        y,
        temperature=temperature,
        k=e.folds,
        seed=conf.seed,
        grid=e.grid,
        select=e.select,
        calibrate=conf.calibration.method != "none",
        t_bounds=list(conf.calibration.t_bounds),
        fold_rows=fold_rows,
        fit_rows=fit_rows,
    )
    model_probs = probabilities(logits, temperature)
    write_rows(
        ctx.out_dir / "ensemble_val.jsonl",
        (
            {
                "id": r.id,
                "label": r.label,
                **{who: dict(zip(labels, p.tolist())) for who, p in (("model", m), ("baseline", b), ("blend", x))},
            }
            for r, m, b, x in zip(rows, model_probs, base_probs, blended)
        ),
    )
    ctx.tracker.log_metrics(
        {
            "ensemble.weight": report["weight"],
            **{f"ensemble.{who}.oof_{k}": v for who, s in report["oof"].items() for k, v in s.items()},
        }
    )
    ctx.tracker.set_tags({"ensemble.choice": report["choice"]})
    return report, blended


def save_blend_baseline(out_dir: Path, baseline_model, base_probs: np.ndarray, rows: list) -> list[str]:
    """The fitted baseline as ``baseline/model.skops``, reloaded and checked to give the val probabilities the
    blend was chosen with (the weights' own check is ``export_model``'s); returns the part to list in the manifest."""
    with atomic_dir(out_dir / "baseline") as tmp:
        save_baseline(baseline_model, tmp / Path(BASELINE_FILE).name)
    reloaded = predict_proba(load_baseline(out_dir / BASELINE_FILE), rows, base_probs.shape[1])
    if not np.array_equal(reloaded, base_probs):
        raise ExportError(
            f"export verification failed: {BASELINE_FILE} reloaded scores the val rows differently "
            f"(max abs diff {np.abs(reloaded - base_probs).max():.3e})"
        )
    log.info("export check: %s reproduces the baseline's val probabilities exactly", BASELINE_FILE)
    return ["baseline"]


def test_report(
    conf: ClassificationConf,
    model,
    test_loader,
    loss_fn,
    metrics: dict[str, Any],
    ctx: RunContext,
    base_probs: np.ndarray | None = None,
) -> dict[str, Any]:
    """The test split, scored once with the final model (best evaluation's weights, val-fit temperature):
    ``test_*`` beside the ``val_*`` metrics in ``metrics.json`` and MLflow. Runs after every choice is made, so
    nothing here can feed back into the epoch, the temperature or the weights. ``base_probs`` (ensemble=blend: the
    baseline's test probabilities in the loader's order): model, baseline and exported blend on test too."""
    labels, temperature, n_bins = list(conf.data.labels), metrics["temperature"], conf.calibration.n_bins
    logits, y = predict_logits(model, test_loader, ctx.device, conf.hardware.precision)
    report = classification_metrics(y, logits.argmax(-1), labels, prefix="test_")  # T > 0 keeps the argmax
    with torch.no_grad():
        loss = loss_fn(torch.from_numpy(logits).to(ctx.device), torch.from_numpy(y).to(ctx.device)).item()
    scalars = {
        **report["scalars"],
        "test_loss": loss,
        **{f"test_{k}": v for k, v in calibration_metrics(probabilities(logits), y, n_bins).items()},
    }
    if conf.calibration.method != "none":
        scalars.update(
            {
                f"test_{k}_calibrated": v
                for k, v in calibration_metrics(probabilities(logits, temperature), y, n_bins).items()
            }
        )
    out = {
        **metrics,
        **scalars,
        "test": {
            "file": str(conf.data.test_file),
            "rows": len(y),
            "temperature": temperature,
            "per_class": report["per_class"],
            "confusion_matrix": report["confusion_matrix"],
            "use": "scored once after training; never used for early stopping, calibration or model choice",
        },
    }
    served = probabilities(logits, temperature)
    if base_probs is not None and metrics.get("ensemble"):
        e, model_probs = metrics["ensemble"], served
        base = calibrated_baseline(base_probs, e["baseline_temperature"])
        served = blend(model_probs, base, e["weight"])
        test = {"model": scores(model_probs, y), "baseline": scores(base, y), "blend": scores(served, y)}
        out["ensemble"] = {**e, "test": test}
        ctx.tracker.log_metrics({f"ensemble.{who}.test_{k}": v for who, s in test.items() for k, v in s.items()})
    if metrics.get("decision"):
        out["decision"] = test_decisions(conf, metrics["decision"], served, y, ctx)
    atomic_write_json(ctx.out_dir / "metrics.json", out)
    ctx.tracker.log_metrics(
        {
            f"calibrated.{k.removesuffix('_calibrated')}" if k.endswith("_calibrated") else k: v
            for k, v in scalars.items()
        },
        step=metrics["best_epoch"],
    )  # the naming of docs/mlflow.md
    log.info("test split (%d rows, %s): macro-F1 %.4f", len(y), conf.data.test_file, scalars["test_macro_f1"])
    return out


def calibration_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The MLflow names of the calibration scalars: ``best.val_nll`` (raw, best epoch), ``calibrated.val_nll`` (with
    the fitted temperature), ``calibrated.temperature``."""
    out = {}
    for key, value in metrics.items():
        if key == "temperature" or key.endswith("_calibrated"):
            out[f"calibrated.{key.removesuffix('_calibrated')}"] = value
        elif key.startswith(CALIBRATION_KEYS):
            out[f"best.{key}"] = value
    return out


def lora_settings(lora) -> dict[str, Any]:
    """The ``lora`` group as plain values (``loralab.json``): how the adapter was configured."""
    return {k: (list(v) if isinstance(v, list) else v) for k, v in vars(lora).items()}


def zip_parts(out_dir: Path, parts, max_mb: float) -> list[str]:
    """``auto``: merged + adapter (+ base) when they fit the size gate, else the adapter (+ base) — a real model's
    merged weights (GBs) stay in the run dir instead of failing a finished run at the last step."""
    if parts != "auto":
        return [p for p in parts if (out_dir / p).exists()]
    present = [p for p in ("merged", "adapter", "base", "baseline", "loralab.json") if (out_dir / p).exists()]
    size_mb = sum(f.stat().st_size for p in present for f in (out_dir / p).rglob("*") if f.is_file()) / 2**20
    if size_mb <= max_mb or "adapter" not in present:
        return present
    # A base that exists only here (random init, or pretrained by this run) goes with its adapter: without it the
    # adapter loads nowhere.
    log.warning(
        "export: merged/ + adapter/ are %.0f MB > export.max_size_mb=%g; model_final.zip holds the adapter%s "
        "(merged/ stays in the run dir)",
        size_mb,
        max_mb,
        " and the base it needs" if "base" in present else "",
    )
    return [p for p in ("adapter", "base", "baseline", "loralab.json") if p in present]


def serialization(serializer, source) -> dict[str, Any]:
    """How texts were made and cut: ``serializer`` is the fitted serializer's state (``load_serializer`` rebuilds
    it); ``template`` (and the json flags, for that form) are kept for readers of earlier exports."""
    json_flags = {"json_sort_keys": True, "json_ensure_ascii": True} if serializer.kind == "json" else {}
    return {
        "template": serializer.template,
        **json_flags,
        "serializer": serializer.state(),
        "max_length": source.max_length,
        "truncation_side": source.truncation_side,
    }


def export_meta(
    conf: ClassificationConf, source, metrics: dict[str, Any], result: RunResult, serializer: Serializer | None = None
) -> dict[str, Any]:
    """``loralab.json``: what predict/evaluate need to score exactly as training did, and where it came from.
    ``serializer``: the run's fitted one (None: the json form of ``data.template``)."""
    serializer = serializer or Json(conf.data.template)
    prov = result.provenance
    data_files = {k: p for k, p in conf.data.files().items() if p and k != "test_file"}
    return {
        "labels": list(conf.data.labels),
        "temperature": metrics["temperature"],
        "calibration": metrics["calibration"],
        "serialization": serialization(serializer, source),
        "max_length": source.max_length,
        "allow_null": conf.data.allow_null,
        "max_row_bytes": conf.data.max_row_bytes,
        "columns": {"id": conf.data.id_column, "label": conf.data.label_column},  # predict/evaluate's table defaults
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        "gates": dict(conf.trainer.gates or {}),
        "data": {
            k: {"path": str(p), "sha256": prov.get(f"data.{k}.sha256") or sha256_file(p)} for k, p in data_files.items()
        },
        "model": {
            "name": source.name,
            "hub_id": source.hub_id,
            "path": source.path,
            "pretrained": source.pretrained,
            "pretrain_key": source.pretrain_key,  # set: the base was pretrained by this run's pretrain stage
            "lora": lora_settings(conf.lora) if conf.lora.enabled else None,
        },
        "ensemble": {
            k: metrics["ensemble"][k]
            for k in ("method", "choice", "weight", "baseline_temperature", "baseline_file", "trusted_types")
        }
        if metrics.get("ensemble")
        else None,
        **({"decision": export_decision(metrics["decision"])} if metrics.get("decision") else {}),
        **code_version(prov),
    }


def export_decision(report: dict[str, Any]) -> dict[str, Any]:
    """``loralab.json``'s ``decision``: what predict, evaluate and the MLflow model apply to the served
    probabilities (thresholds chosen on all of val; a label whose target was unreachable has none: it never acts)."""
    return {k: report[k] for k in ("method", "rule", "fallback", "targets", "thresholds", "min_rows")}


def export(
    conf: ClassificationConf,
    model,
    tokenizer,
    source,
    val_loader,
    metrics: dict[str, Any],
    result: RunResult,
    ctx: RunContext,
    serializer: Serializer | None = None,
    extra_parts: list[str] | None = None,
) -> list[Path]:
    """``checkpoint_best/``, then the export (merged, adapter, loralab.json; verified by reloading) and its zip;
    ``extra_parts``: part dirs already written (``baseline``) for the manifest. Returns the files for MLflow."""
    out_dir, e = ctx.out_dir, conf.export
    serializer = serializer or Json(conf.data.template)
    save_checkpoint(
        out_dir / "checkpoint_best",
        model,
        tokenizer,
        {
            "epoch": result.best_epoch,
            "labels": list(conf.data.labels),
            "template": serializer.template,
            "serializer": serializer.state(),
            "max_length": source.max_length,
            conf.trainer.monitor: result.best[conf.trainer.monitor],
        },
    )
    batch = next(iter(val_loader))  # rows spread over the first (longest-first) batch: mixed padding
    rows = torch.linspace(0, len(batch["input_ids"]) - 1, min(e.verify_rows, len(batch["input_ids"]))).long()
    # Export (and its reload check, specified in fp32) from an fp32 copy: a LoRA run on CUDA keeps its base in
    # 16 bits and its adapters/head in fp32, which only mix under autocast.
    model = model.to("cpu", torch.float32)
    export_model(
        model,
        tokenizer,
        out_dir,
        {k: v[rows] for k, v in batch.items()},
        meta=export_meta(conf, source, metrics, result, serializer),
        base_location=source.location,
        save_base=source.local_base,
        atol=e.verify_atol,
        trust_remote_code=source.trust_remote_code,
        extra_parts=extra_parts or [],
    )
    artifacts = [
        out_dir / n
        for n in (
            "metrics.json",
            "data_report.json",
            "loralab.json",
            *(["ensemble_val.jsonl"] if extra_parts else []),
            *(["decisions_val.jsonl"] if metrics.get("decision") else []),
        )
    ]
    if e.zip:
        artifacts.append(
            zip_dir(
                out_dir,
                out_dir / "model_final.zip",
                e.max_size_mb,
                include=zip_parts(out_dir, e.zip_parts, e.max_size_mb),
            )
        )
    return [*artifacts, out_dir / "checkpoint_best"]
