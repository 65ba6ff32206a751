"""Scoring records (JSONL, CSV or Parquet) with an exported model (a ``model_final.zip`` or a run dir holding
``loralab.json``).

Rows are validated exactly as in training (``load_records``); bad ones are counted by reason and left out, never
fatal. Texts are made by the run's own fitted serializer (rebuilt from ``loralab.json``), scored in length-sorted
batches (little padding), and written back in input order with the calibrated probability of every label.
``evaluate_file`` scores a labelled file into a metrics report shaped like training's ``metrics.json``. The command
lines are ``loralab.cli.predict`` and ``loralab.cli.evaluate``.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
)

from loralab.baseline import predict_proba
from loralab.calibrate import calibration_metrics, probabilities
from loralab.core.device import resolve_device
from loralab.core.trainer import predict_logits
from loralab.data.records import MAX_ROW_BYTES, DataError, Record, RowFormat, check_readable, load_records, write_rows
from loralab.data.serialize import Json, Serializer, load_serializer
from loralab.data.text import TokenizedRecords, TokenizedTexts, length_sorted_order
from loralab.decisions import decide, thresholds_by_index
from loralab.decisions import scalars as decision_scalars
from loralab.ensemble import blend, calibrated_baseline, load_baseline, scores
from loralab.export import (
    META_FILE,
    ExportError,
    check_manifest,
    extract_export,
    load_base,
    read_meta,
)
from loralab.fs import atomic_write_json, writable_file
from loralab.metrics import classification_metrics, evaluate_gates

log = logging.getLogger(__name__)


@dataclass
class Exported:
    """A loaded export: the model (fp32, eval mode), its tokenizer and ``loralab.json``."""

    model: Any
    tokenizer: Any
    meta: dict[str, Any]
    part: str  # which form was loaded: merged | adapter
    baseline: Any = None  # ensemble=blend exports: the fitted scikit-learn baseline (from baseline/model.skops)

    @property
    def labels(self) -> list[str]:
        return list(self.meta["labels"])

    @property
    def temperature(self) -> float:
        return float(self.meta["temperature"])

    @property
    def blend_weight(self) -> float | None:
        """The model's weight in the exported blend (``ensemble=blend``), else None: the model alone."""
        return float(self.meta["ensemble"]["weight"]) if self.baseline is not None else None

    @property
    def decision(self) -> dict[str, Any] | None:
        """``decision=precision`` exports: the thresholds, the fallback and the rule; None: argmax."""
        return self.meta.get("decision")

    def answers(self, probs: np.ndarray) -> list[dict[str, Any]]:
        """Per row of served probabilities, what predict writes beside the id: the label (argmax, or the decision
        with its ``abstained`` flag under ``decision=precision``) and the probabilities by label."""
        labels = self.labels
        by_label = [dict(zip(labels, p.tolist())) for p in probs]
        if self.decision is None:
            return [{"label": labels[int(p.argmax())], "probs": d} for p, d in zip(probs, by_label)]
        decided, abstained = decide(probs, *thresholds_by_index(self.decision, labels))
        return [{"label": labels[k], "abstained": bool(a), "probs": d} for k, a, d in zip(decided, abstained, by_label)]

    @cached_property
    def serializer(self) -> Serializer:
        """The training run's fitted serializer; exports made before ``conf/serialize`` used the json form."""
        ser = self.meta["serialization"]
        return load_serializer(ser["serializer"]) if "serializer" in ser else Json(ser["template"])


def _load_dir(root: Path, device: torch.device, trust_remote_code: bool, hashed: bool = False) -> Exported:
    """``hashed``: ``root`` was unpacked by ``extract_export``, which hashed every file as it wrote it."""
    meta = read_meta(root)
    parts = [p for p in meta.get("parts", []) if (root / p).is_dir()]
    check_manifest(root, meta["files"], parts, hashes=not hashed)
    if "merged" in parts:
        part = "merged"
        model = AutoModelForSequenceClassification.from_pretrained(
            root / "merged", dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    elif "adapter" in parts:
        part, base_info = "adapter", meta["base"]
        location = root / "base" if "base" in parts else base_info.get("location")
        if not location:
            raise ExportError(
                f"{root}: adapter only, and its random base was not exported (add base to "
                f"export.zip_parts or use the run dir)"
            )
        base = load_base(location, base_info["label_config"], trust_remote_code)
        # peft (~2 s of CPU to import) loads only for an adapter-only export; merged/ is plain transformers
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, root / "adapter")
    else:
        raise ExportError(f"{root}: neither merged/ nor adapter/ present (parts in {META_FILE}: {meta.get('parts')})")
    baseline = None
    if ensemble := meta.get("ensemble"):
        if "baseline" not in parts:
            raise ExportError(
                f"{root}: {META_FILE} says ensemble={ensemble['method']} but baseline/ is missing (add "
                f"baseline to export.zip_parts or use the run dir)"
            )
        baseline = load_baseline(root / ensemble["baseline_file"])  # manifest-checked above; trusted types only
    tokenizer = AutoTokenizer.from_pretrained(root / part, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "right"  # the classifier pools the last non-pad token
    tokenizer.truncation_side = meta["serialization"]["truncation_side"]
    log.info("loaded %s/ from %s (labels %s, T=%.4f)", part, root, meta["labels"], meta["temperature"])
    return Exported(model.to(device).eval(), tokenizer, meta, part, baseline)


def load_exported(path: str | Path, device: torch.device | str = "cpu", trust_remote_code: bool = False) -> Exported:
    """Load from a zip (checked entry by entry, extracted to a temporary dir) or an export directory; the files
    must match the sha256 manifest in ``loralab.json``. Only safetensors are read."""
    path, device = Path(path), torch.device(device)
    if path.is_dir():
        return _load_dir(path, device, trust_remote_code)
    if not path.is_file():
        raise ExportError(f"model not found: {path}")
    with tempfile.TemporaryDirectory(prefix="loralab-model-") as tmp:
        extract_export(path, tmp)
        return _load_dir(Path(tmp), device, trust_remote_code, hashed=True)  # weights are in memory before tmp goes


def score(exported: Exported, records: Sequence[Record], batch_size: int = 64) -> np.ndarray:
    """Raw logits (float32) in the order of ``records``; batches are formed longest first."""
    meta = exported.meta
    ds = TokenizedRecords(records, exported.tokenizer, None, exported.serializer, meta["max_length"])
    return score_texts(exported.model, exported.tokenizer, ds, meta["max_length"], batch_size)


def predict_probs(
    exported: Exported, records: Sequence[Record], batch_size: int = 64, logits: np.ndarray | None = None
) -> np.ndarray:
    """What an export serves per record: the calibrated probabilities, blended with the baseline's on the
    features (the in-run baseline's feature table) when it was exported with ``ensemble=blend``. ``logits``:
    ``score``'s output when the caller already has it."""
    logits = score(exported, records, batch_size) if logits is None else logits
    probs = probabilities(logits, exported.temperature)
    if exported.baseline is None:
        return probs
    base = calibrated_baseline(
        predict_proba(exported.baseline, records, len(exported.labels)),
        float(exported.meta["ensemble"]["baseline_temperature"]),
    )
    return blend(probs, base, exported.blend_weight)


def score_texts(model, tokenizer, ds: TokenizedTexts, max_length: int, batch_size: int = 64) -> np.ndarray:
    """Raw outputs (float32) of a tokenized dataset in its order: every exported text model scores through here."""
    if ds.truncated:
        log.warning("%d texts truncated at max_length=%d", ds.truncated, max_length)
    order = length_sorted_order(ds)
    loader = DataLoader(
        ds, batch_size=batch_size, sampler=order, collate_fn=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)
    )
    sorted_logits, _ = predict_logits(model, loader, next(model.parameters()).device)
    logits = np.empty_like(sorted_logits)
    logits[order] = sorted_logits
    return logits


def row_format(
    meta: dict[str, Any], format: str = "auto", id_column: str | None = None, label_column: str | None = None
) -> RowFormat:
    """How to read an input file: the given format and column names, else those the model was trained with."""
    columns = meta.get("columns", {})
    return RowFormat(format, id_column or columns.get("id", "id"), label_column or columns.get("label", "label"))


def row_cap(meta: dict[str, Any], max_row_bytes: int | None) -> int:
    """The row size cap: the caller's, else the one the model was trained with (older exports: the default)."""
    return max_row_bytes or meta.get("max_row_bytes", MAX_ROW_BYTES)


def predict_file(
    model: str | Path,
    input: str | Path,
    output: str | Path,
    batch_size: int = 64,
    device: str = "auto",
    trust_remote_code: bool = False,
    columns: dict[str, Any] | None = None,
    max_row_bytes: int | None = None,
) -> dict[str, Any]:
    """Score ``input`` into ``output`` (``{"id", "label", "probs": {label: p}}`` per valid row, input order).
    ``columns``: ``row_format``'s format, id_column, label_column (default: by extension, as in training). The
    input and output paths are checked before the model loads."""
    check_readable(input)
    writable_file(output, "output")
    exported = load_exported(model, resolve_device(device), trust_remote_code)
    records, report = load_records(
        input,
        labels=None,
        allow_null=exported.meta.get("allow_null", False),
        fmt=row_format(exported.meta, **(columns or {})),
        max_row_bytes=row_cap(exported.meta, max_row_bytes),
    )
    if not records:
        raise DataError(f"{input}: no valid rows to score (dropped by reason: {dict(report.dropped)})")
    t0 = time.perf_counter()
    probs = predict_probs(exported, records, batch_size)
    seconds = time.perf_counter() - t0
    answers = exported.answers(probs)
    write_rows(output, ({"id": r.id, **a} for r, a in zip(records, answers)))
    return {
        **report.as_dict(),
        "output": str(output),
        "model_part": exported.part,
        "temperature": exported.temperature,
        "blend_weight": exported.blend_weight,
        "abstained": sum(a.get("abstained", False) for a in answers) if exported.decision else None,
        "decided": {k: sum(a["label"] == k for a in answers) for k in exported.labels} if exported.decision else None,
        "score_seconds": seconds,
        "rows_per_s": len(records) / seconds,
    }


def evaluate_file(
    model: str | Path,
    input: str | Path,
    output: str | Path | None = None,
    prefix: str = "test_",
    batch_size: int = 64,
    device: str = "auto",
    trust_remote_code: bool = False,
    columns: dict[str, Any] | None = None,
    max_row_bytes: int | None = None,
) -> dict[str, Any]:
    """Score a labelled file; write and return scalars (``<prefix>macro_f1``…, NLL/ECE/Brier raw and with the
    exported temperature), per-class table, confusion matrix and the training gates applied to this file."""
    output = writable_file(Path(output) if output else Path(input).with_suffix(".metrics.json"), "output")
    check_readable(input)
    exported = load_exported(model, resolve_device(device), trust_remote_code)
    labels, meta = exported.labels, exported.meta
    records, report = load_records(
        input,
        labels=labels,
        allow_null=meta.get("allow_null", False),
        fmt=row_format(meta, **(columns or {})),
        max_row_bytes=row_cap(meta, max_row_bytes),
    )
    if not records:
        raise DataError(f"{input}: no valid labelled rows (dropped by reason: {dict(report.dropped)})")
    y = [labels.index(r.label) for r in records]
    logits = score(exported, records, batch_size)
    cls = classification_metrics(y, logits.argmax(-1), labels, prefix=prefix)
    n_bins = meta.get("calibration", {}).get("n_bins", 15)
    raw = calibration_metrics(probabilities(logits), y, n_bins)
    calibrated = calibration_metrics(probabilities(logits, exported.temperature), y, n_bins)
    scalars = {
        **cls["scalars"],
        **{f"{prefix}{k}": v for k, v in raw.items()},
        **{f"{prefix}{k}_calibrated": v for k, v in calibrated.items()},
    }
    # Training's gates are written for val_* keys; the same thresholds apply to this file's keys.
    gates = {prefix + k.removeprefix("val_"): rule for k, rule in meta.get("gates", {}).items()}
    metrics = {
        "temperature": exported.temperature,
        **scalars,
        "per_class": cls["per_class"],
        "confusion_matrix": cls["confusion_matrix"],
        "gates": evaluate_gates(scalars, gates),
        "input": report.as_dict(),
        "model_part": exported.part,
    }
    served = predict_probs(exported, records, logits=logits)
    if exported.baseline is not None:  # what predict serves; the gates above judge the learned model itself
        metrics["ensemble"] = {
            "weight": exported.blend_weight,
            "choice": exported.meta["ensemble"]["choice"],
            **{prefix + k: v for k, v in scores(served, y).items()},
        }
    if (d := exported.decision) is not None:  # what predict answers: the decisions on the served probabilities
        decided, abstained = decide(served, *thresholds_by_index(d, labels))
        decided_scalars = decision_scalars(decided, y, labels, list(d["thresholds"]), prefix)
        argmax_scalars = decision_scalars(served.argmax(axis=1), y, labels, list(d["thresholds"]), prefix)
        metrics["decision"] = {
            "fallback": d["fallback"],
            "thresholds": d["thresholds"],
            "targets": d["targets"],
            "abstained": int(abstained.sum()),
            **decided_scalars,
            "gates": evaluate_gates(decided_scalars, gates),
            "argmax": {**argmax_scalars, "gates": evaluate_gates(argmax_scalars, gates)},
        }
    atomic_write_json(output, metrics)
    return {**metrics, "output": str(output)}
