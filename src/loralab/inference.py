"""Scoring JSONL records with an exported model (a ``model_final.zip`` or a run dir holding ``loralab.json``).

Rows are validated exactly as in training (``load_records``); bad ones are counted by reason and left out, never
fatal. Texts are serialized with the recorded template, scored in length-sorted batches (little padding), and
written back in input order with the calibrated probability of every label.

CLI: ``python predict.py model=<zip or dir> input=<jsonl> output=<jsonl> [batch_size=64] [device=auto]``
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from peft import PeftModel
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
)

from loralab.calibrate import probabilities
from loralab.core.device import resolve_device  # noqa: F401  (also imported from here by run.py, regression)
from loralab.data.records import DataError, Record, load_records, write_rows
from loralab.data.text import TokenizedRecords, length_sorted_order
from loralab.export import (
    META_FILE,
    ExportError,
    check_manifest,
    load_base,
    safe_extract,
)
from loralab.core.trainer import predict_logits

log = logging.getLogger(__name__)

MAX_EXTRACT_MB = 64 * 1024  # refuse zips that would unpack to more than this (zip bombs)


@dataclass
class Exported:
    """A loaded export: the model (fp32, eval mode), its tokenizer and ``loralab.json``."""

    model: Any
    tokenizer: Any
    meta: dict[str, Any]
    part: str  # which form was loaded: merged | adapter

    @property
    def labels(self) -> list[str]:
        return list(self.meta["labels"])

    @property
    def temperature(self) -> float:
        return float(self.meta["temperature"])


def _load_dir(root: Path, device: torch.device, trust_remote_code: bool) -> Exported:
    meta_path = root / META_FILE
    if not meta_path.is_file():
        raise ExportError(f"{root}: no {META_FILE}; pass a model_final.zip or the run dir of an exported model")
    meta = json.loads(meta_path.read_text())
    parts = [p for p in meta.get("parts", []) if (root / p).is_dir()]
    check_manifest(root, meta["files"], parts)
    if "merged" in parts:
        part = "merged"
        model = AutoModelForSequenceClassification.from_pretrained(
            root / "merged", dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code)
    elif "adapter" in parts:
        part, base_info = "adapter", meta["base"]
        location = root / "base" if "base" in parts else base_info.get("location")
        if not location:
            raise ExportError(f"{root}: adapter only, and its random base was not exported (add base to "
                              f"export.zip_parts or use the run dir)")
        base = load_base(location, base_info["label_config"], trust_remote_code)
        model = PeftModel.from_pretrained(base, root / "adapter")
    else:
        raise ExportError(f"{root}: neither merged/ nor adapter/ present (parts in {META_FILE}: {meta.get('parts')})")
    tokenizer = AutoTokenizer.from_pretrained(root / part, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "right"  # the classifier pools the last non-pad token
    tokenizer.truncation_side = meta["serialization"]["truncation_side"]
    log.info("loaded %s/ from %s (labels %s, T=%.4f)", part, root, meta["labels"], meta["temperature"])
    return Exported(model.to(device).eval(), tokenizer, meta, part)


def load_exported(path: str | Path, device: torch.device | str = "cpu", trust_remote_code: bool = False) -> Exported:
    """Load from a zip (checked entry by entry, extracted to a temporary dir) or an export directory; the files
    must match the sha256 manifest in ``loralab.json``. Only safetensors are read."""
    path, device = Path(path), torch.device(device)
    if path.is_dir():
        return _load_dir(path, device, trust_remote_code)
    if not path.is_file():
        raise ExportError(f"model not found: {path}")
    with tempfile.TemporaryDirectory(prefix="loralab-model-") as tmp:
        safe_extract(path, tmp, max_mb=MAX_EXTRACT_MB)
        return _load_dir(Path(tmp), device, trust_remote_code)  # weights are in memory before tmp goes


def score(exported: Exported, records: Sequence[Record], batch_size: int = 64) -> np.ndarray:
    """Raw logits (float32) in the order of ``records``; batches are formed longest first."""
    meta, device = exported.meta, next(exported.model.parameters()).device
    ds = TokenizedRecords(records, exported.tokenizer, None, meta["serialization"]["template"], meta["max_length"])
    if ds.truncated:
        log.warning("%d texts truncated at max_length=%d", ds.truncated, meta["max_length"])
    order = length_sorted_order(ds)
    loader = DataLoader(ds, batch_size=batch_size, sampler=order,
                        collate_fn=DataCollatorWithPadding(exported.tokenizer, pad_to_multiple_of=8))
    sorted_logits, _ = predict_logits(exported.model, loader, device)
    logits = np.empty_like(sorted_logits)
    logits[order] = sorted_logits
    return logits


def predict_file(model: str | Path, input: str | Path, output: str | Path, batch_size: int = 64,
                 device: str = "auto", trust_remote_code: bool = False) -> dict[str, Any]:
    """Score ``input`` into ``output`` (``{"id", "label", "probs": {label: p}}`` per valid row, input order)."""
    exported = load_exported(model, resolve_device(device), trust_remote_code)
    records, report = load_records(input, labels=None, allow_null=exported.meta.get("allow_null", False))
    if not records:
        raise DataError(f"{input}: no valid rows to score (dropped by reason: {dict(report.dropped)})")
    t0 = time.perf_counter()
    probs = probabilities(score(exported, records, batch_size), exported.temperature)
    seconds = time.perf_counter() - t0
    labels = exported.labels
    write_rows(output, ({"id": r.id, "label": labels[int(p.argmax())], "probs": dict(zip(labels, p.tolist()))}
                        for r, p in zip(records, probs)))
    return {**report.as_dict(), "output": str(output), "model_part": exported.part,
            "temperature": exported.temperature, "score_seconds": seconds, "rows_per_s": len(records) / seconds}


# ---------------------------------------------------------------------------------------------------------- CLI

@dataclass
class PredictArgs:
    model: str = MISSING  # model_final.zip or a run dir with loralab.json
    input: str = MISSING  # JSONL of {"id", "features"} rows (a label, if present, is ignored)
    output: str = MISSING  # JSONL written with id, label, probs
    batch_size: int = 64
    device: str = "auto"  # auto | cpu | cuda | cuda:1 ...
    trust_remote_code: bool = False  # never run code shipped with a model unless set


def parse_args(schema: type, argv: Sequence[str]):
    """``key=value`` arguments checked against a dataclass: unknown keys, bad types and missing values are one-line
    errors (OmegaConf's CLI parser; not Hydra, whose ``model=`` would select the ``conf/model`` group)."""
    try:
        args = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_cli(list(argv)))
        missing = sorted(OmegaConf.missing_keys(args))
        if missing:
            raise ValueError(f"missing {', '.join(f'{k}=...' for k in missing)}")
        return OmegaConf.to_object(args)
    except (OmegaConfBaseException, ValueError) as err:
        raise ValueError(str(err).splitlines()[0]) from None


def run_cli(fn, schema: type, argv: Sequence[str] | None, usage: str) -> int:
    """Shared entry point of predict/evaluate: parse, run, print one line per outcome; exit 2 on bad input."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(schema, argv)
    except ValueError as err:
        print(f"error: {err}\nusage: {usage}", file=sys.stderr)
        return 2
    try:
        fn(args)
    except (DataError, ExportError) as err:
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    return 0


def _predict(args: PredictArgs) -> None:
    stats = predict_file(args.model, args.input, args.output, args.batch_size, args.device, args.trust_remote_code)
    print(f"scored {stats['rows_kept']} of {stats['rows_read']} rows in {stats['score_seconds']:.2f} s "
          f"({stats['rows_per_s']:.1f} rows/s) -> {stats['output']}")
    if stats["rows_dropped"]:
        print(f"dropped {stats['rows_dropped']} rows: " + ", ".join(
            f"{reason}={n} (first at line {stats['first_line_by_reason'][reason]})"
            for reason, n in stats["dropped_by_reason"].items()))


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_predict, PredictArgs, argv, "python predict.py model=<zip or dir> input=<jsonl> output=<jsonl>")


if __name__ == "__main__":
    sys.exit(main())
