"""Exporting the best model: merged weights, the PEFT adapter, ``loralab.json``, a size-gated zip, and a
self-check that stock transformers/peft reload every exported form with the in-memory model's logits.

Layout (in the run dir, and in ``model_final.zip`` for the parts ``export.zip_parts`` names)::

    merged/        full model (LoRA merged into the base), safetensors + config + tokenizer
    adapter/       PEFT adapter (LoRA + score head) for ``PeftModel.from_pretrained`` (LoRA runs only)
    base/          the base the adapter belongs to when it exists nowhere else (LoRA over a random-init base or one
                   the pretrain stage trained: ``ModelSource.local_base``)
    baseline/      ``ensemble=blend`` only: the fitted scikit-learn baseline as ``model.skops`` (no pickle)
    loralab.json   labels, temperature, serialization, metrics, data hashes, versions, sha256 of every file
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from transformers import AutoModelForSequenceClassification

from loralab.archive import checked_zip, extract_entry
from loralab.errors import ExportError
from loralab.fs import atomic_dir, atomic_write_json, file_manifest, sha256_file

log = logging.getLogger(__name__)

META_FILE = "loralab.json"
DIGEST = "digest"  # loralab.json's own sha256 (of the rest of it): what the manifest is to the weights
MAX_META_BYTES = 16 * 2**20  # a loralab.json larger than this is not one loralab wrote
FORMAT = "loralab-export/1"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")  # never loaded: torch.load unpickles
LABEL_CONFIG_KEYS = ("num_labels", "id2label", "label2id", "problem_type", "pad_token_id")


# ----------------------------------------------------------------------------------------------- files and zips


def manifest(root: str | Path, parts: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{relative/posix/path: {sha256, bytes}}`` for every file under the given part directories of ``root``."""
    return {name: entry for part in parts for name, entry in file_manifest(root, under=part).items()}


def meta_digest(meta: dict[str, Any]) -> str:
    """sha256 of ``loralab.json`` without its own ``digest`` (canonical JSON): an edit after export shows."""
    body = {k: v for k, v in meta.items() if k != DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def write_meta(out_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    meta = {**meta, DIGEST: meta_digest(meta)}
    atomic_write_json(out_dir / META_FILE, meta)
    return meta


def read_meta(root: str | Path) -> dict[str, Any]:
    """``loralab.json`` of an export, parsed and trusted only after its digest and values check out; otherwise one
    ``ExportError`` line naming the file. (Exports written before the digest existed are checked by value only.)"""
    path = Path(root) / META_FILE
    if not path.is_file():
        raise ExportError(f"{root}: no {META_FILE}; pass a model_final.zip or the run dir of an exported model")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"{path}: not valid JSON ({err}); re-export the model") from None
    if not isinstance(meta, dict):
        raise ExportError(f"{path}: not a JSON object")
    if DIGEST in meta and meta[DIGEST] != meta_digest(meta):
        raise ExportError(f"{path}: altered after export (its digest does not match its content)")
    if problem := meta_problem(meta):
        raise ExportError(f"{path}: {problem}")
    return meta


def _finite(v: Any, lo: float, hi: float = math.inf, lo_open: bool = True) -> bool:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return ok and (v > lo if lo_open else v >= lo) and v <= hi


def meta_problem(meta: dict[str, Any]) -> str | None:
    """What makes ``loralab.json`` unusable for scoring, or None: each value the scoring path reads, checked."""
    labels = meta.get("labels")
    if not (isinstance(labels, list) and labels and all(isinstance(x, str) and x for x in labels)):
        return f"labels={labels!r}: must be a non-empty list of label names"
    if len(set(labels)) != len(labels):
        return f"labels={labels!r}: names must be unique"
    if not _finite(meta.get("temperature"), 0.0):
        return f"temperature={meta.get('temperature')!r}: must be a finite number > 0"
    max_length = meta.get("max_length")
    if not (isinstance(max_length, int) and not isinstance(max_length, bool) and max_length > 0):
        return f"max_length={max_length!r}: must be an int > 0"
    files, parts = meta.get("files"), meta.get("parts")
    if not (isinstance(parts, list) and all(isinstance(p, str) for p in parts)):
        return f"parts={parts!r}: must be a list of part names"
    if not (isinstance(files, dict) and all(_file_entry(e) for e in files.values())):
        return "files: must map each file to its sha256 and byte size"
    if ensemble := meta.get("ensemble"):
        if not _finite(ensemble.get("weight"), 0.0, 1.0, lo_open=False):
            return f"ensemble.weight={ensemble.get('weight')!r}: must be a number in [0, 1]"
        if not _finite(ensemble.get("baseline_temperature"), 0.0):
            return f"ensemble.baseline_temperature={ensemble.get('baseline_temperature')!r}: must be finite and > 0"
    if "decision" in meta:
        return decision_problem(meta["decision"], labels)
    return None


def decision_problem(decision: Any, labels: list[str]) -> str | None:
    """What makes ``loralab.json``'s ``decision`` unusable, or None: a fallback among the labels, and a threshold
    in [0, 1] (or null: never acts) for each other label with a target in (0, 1]."""
    if not isinstance(decision, dict) or decision.get("method") != "precision":
        return f"decision={decision!r}: must be an object with method 'precision'"
    fallback, thresholds, targets = decision.get("fallback"), decision.get("thresholds"), decision.get("targets")
    if fallback not in labels:
        return f"decision.fallback={fallback!r}: must be one of the labels {labels}"
    if not (isinstance(thresholds, dict) and thresholds and isinstance(targets, dict)):
        return "decision: needs thresholds and targets, one per acting label"
    if set(thresholds) != set(targets):
        return f"decision.thresholds names {sorted(thresholds)}, decision.targets {sorted(targets)}: they must agree"
    for label, t in thresholds.items():
        if label not in labels or label == fallback:
            return f"decision.thresholds.{label}: must name a label other than the fallback ({labels})"
        if t is not None and not _finite(t, 0.0, 1.0, lo_open=False):
            return f"decision.thresholds.{label}={t!r}: must be a probability in [0, 1] or null (never acts)"
        if not _finite(targets[label], 0.0, 1.0):
            return f"decision.targets.{label}={targets[label]!r}: must be in (0, 1]"
    return None


def _file_entry(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("sha256"), str)
        and isinstance(entry.get("bytes"), int)
        and entry["bytes"] >= 0
    )


def check_manifest(
    root: str | Path, files: dict[str, dict[str, Any]], parts: Iterable[str], hashes: bool = True
) -> None:
    """Refuse a model dir whose part files differ from the manifest: missing, altered, extra or pickle files.
    ``hashes=False``: the files were hashed as they were written (``extract_export``); the rest is still checked."""
    root = Path(root)
    present = {p.relative_to(root).as_posix() for part in parts for p in (root / part).rglob("*") if p.is_file()}
    expected = {name for name in files if name.split("/", 1)[0] in set(parts)}
    for name in sorted(present):
        if name.endswith(PICKLE_SUFFIXES):
            raise ExportError(f"{root}: refusing pickle file {name} (only safetensors are loaded)")
    if extra := sorted(present - expected):
        raise ExportError(f"{root}: files not in the {META_FILE} manifest: {extra[:5]}")
    if missing := sorted(expected - present):
        raise ExportError(f"{root}: files listed in the {META_FILE} manifest are missing: {missing[:5]}")
    for name in sorted(expected) if hashes else ():
        if sha256_file(root / name) != files[name]["sha256"]:
            raise ExportError(f"{root}: {name} does not match its sha256 in {META_FILE} (corrupt or altered)")


def extract_export(zip_path: str | Path, dest: str | Path) -> dict[str, Any]:
    """Unpack an export zip into ``dest`` checked against its own manifest as it goes: ``loralab.json`` first
    (size-capped, digest and values checked), then each entry only if the manifest lists it with that size, written
    while its sha256 is computed and refused the moment it differs. A zip bomb costs at most one listed file's
    worth of disk. Returns ``loralab.json``."""
    dest = Path(dest).resolve()
    with checked_zip(zip_path, dest) as zf:
        by_name = {i.filename: i for i in zf.infolist() if not i.is_dir()}
        meta_info = by_name.pop(META_FILE, None)
        if meta_info is None:
            raise ExportError(f"{zip_path}: no {META_FILE}; not a loralab export")
        if meta_info.file_size > MAX_META_BYTES:
            raise ExportError(f"{zip_path}: {META_FILE} is {meta_info.file_size} bytes; refusing it")
        extract_entry(zf, meta_info, dest, MAX_META_BYTES, None, zip_path)
        meta = read_meta(dest)
        files = meta["files"]
        for name, info in by_name.items():  # all of them before anything else is written
            if name not in files:
                raise ExportError(f"{zip_path}: entry {name!r} is not in the {META_FILE} manifest")
            if info.file_size != files[name]["bytes"]:
                raise ExportError(
                    f"{zip_path}: entry {name!r} is {info.file_size} bytes, the manifest says {files[name]['bytes']}"
                )
        for name, info in by_name.items():
            extract_entry(zf, info, dest, files[name]["bytes"], files[name]["sha256"], zip_path)
    return meta


# ---------------------------------------------------------------------------------------------- export + verify


@torch.inference_mode()
def _logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """fp32 logits, no autocast: the reference every exported form must reproduce."""
    model.eval()
    device = next(model.parameters()).device
    return model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()


def _save(directory: Path, model, tokenizer) -> None:
    with atomic_dir(directory) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        config_path = tmp / "config.json"
        if config_path.is_file():  # a full model, not an adapter
            # transformers 5 derives num_labels from id2label and leaves it out; readers of the file expect it.
            config = json.loads(config_path.read_text())
            config["num_labels"] = len(config["id2label"])
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def label_config(model) -> dict[str, Any]:
    """The config keys that make a base checkpoint a classifier with this run's labels."""
    return {k: getattr(model.config, k) for k in LABEL_CONFIG_KEYS}


def load_base(
    location: str | Path,
    label_kwargs: dict[str, Any],
    trust_remote_code: bool = False,
    device: torch.device | str = "cpu",
):
    """The base an adapter belongs to (``base/`` or a hub id/path), with the classifier's label config."""
    return AutoModelForSequenceClassification.from_pretrained(
        location, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code, **label_kwargs
    ).to(device)


def verify_export(
    out_dir: Path,
    reference: torch.Tensor,
    batch: dict[str, torch.Tensor],
    *,
    atol: float,
    base_location: str | Path | None,
    label_kwargs: dict[str, Any],
    trust_remote_code: bool,
    device: torch.device,
    adapter: bool,
) -> dict[str, float]:
    """Reload each exported form with stock transformers/peft and compare logits; raise on a mismatch."""
    # peft (~2 s of CPU to import) loads where a model is exported: readers of an export's files never need it
    from peft import PeftModel

    diffs = {}
    merged = AutoModelForSequenceClassification.from_pretrained(
        out_dir / "merged", dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    diffs["merged"] = (_logits(merged.to(device), batch) - reference).abs().max().item()
    del merged
    if adapter:
        base = load_base(base_location, label_kwargs, trust_remote_code, device)
        adapted = PeftModel.from_pretrained(base, out_dir / "adapter")
        diffs["adapter"] = (_logits(adapted, batch) - reference).abs().max().item()
        del base, adapted
    for part, diff in diffs.items():
        log.info("export check: %s/ reproduces the in-memory logits, max abs diff %.2e", part, diff)
        if not diff <= atol:  # NaN fails too
            raise ExportError(
                f"export verification failed: {part}/ logits differ from the in-memory model by "
                f"{diff:.3e} (> export.verify_atol={atol:g})"
            )
    return diffs


def export_model(
    model,
    tokenizer,
    out_dir: str | Path,
    batch: dict[str, torch.Tensor],
    *,
    meta: dict[str, Any],
    base_location: str | None,
    save_base: bool,
    atol: float = 1e-4,
    trust_remote_code: bool = False,
    extra_parts: Sequence[str] = (),
) -> dict[str, Any]:
    """Write merged/, adapter/ and base/ (as applicable) and ``loralab.json`` into ``out_dir``, then verify.

    ``model`` is the trained model (a ``PeftModel`` for LoRA runs) and is consumed: its adapter is unloaded.
    ``batch`` (input_ids, attention_mask) is what the reloaded forms must score like the in-memory model.
    ``save_base`` writes base/ (needed when the base exists nowhere else); otherwise ``base_location`` (hub id or
    path) is where the adapter's base is loaded from, and is recorded. ``extra_parts``: part dirs the caller wrote
    and checked (``baseline/``), listed in the parts and the manifest like the weights.
    """
    from peft import PeftModel

    out_dir = Path(out_dir)
    batch = {k: v for k, v in batch.items() if k != "labels"}
    device = next(model.parameters()).device
    reference = _logits(model, batch)
    written = []
    if isinstance(model, PeftModel):
        _save(out_dir / "adapter", model, tokenizer)
        written.append("adapter")
        model.delete_adapter(model.active_adapter)  # puts the original score head back: unload() = untouched base
        base = model.unload()
        if save_base:
            _save(out_dir / "base", base, tokenizer)
            written.append("base")
            base_location = out_dir / "base"
        # Merge the adapter as saved, so merged/ can only be right if adapter/ is complete.
        merged = PeftModel.from_pretrained(base, out_dir / "adapter").merge_and_unload()
    else:
        merged = model
    _save(out_dir / "merged", merged, tokenizer)
    written.insert(0, "merged")
    labels_cfg = label_config(merged)
    diffs = verify_export(
        out_dir,
        reference,
        batch,
        atol=atol,
        base_location=base_location,
        label_kwargs=labels_cfg,
        trust_remote_code=trust_remote_code,
        device=device,
        adapter="adapter" in written,
    )
    written += list(extra_parts)
    meta = {
        "format": FORMAT,
        **meta,
        "parts": written,
        "base": {
            "saved_as": "base" if "base" in written else None,
            "location": None if save_base else (str(base_location) if base_location else None),
            "label_config": labels_cfg,
        },
        "verification": {"max_abs_diff": diffs, "atol": atol, "rows": int(batch["input_ids"].shape[0])},
        "files": manifest(out_dir, written),
    }
    meta = write_meta(out_dir, meta)
    log.info("exported %s to %s", ", ".join(written), out_dir)
    return meta
