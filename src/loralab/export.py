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

import json
import logging
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Sequence

import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from loralab.errors import ExportError
from loralab.fs import atomic_dir, atomic_path, atomic_write_json, sha256_file

log = logging.getLogger(__name__)

META_FILE = "loralab.json"
FORMAT = "loralab-export/1"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")  # never loaded: torch.load unpickles
LABEL_CONFIG_KEYS = ("num_labels", "id2label", "label2id", "problem_type", "pad_token_id")


# ----------------------------------------------------------------------------------------------- files and zips


def manifest(root: str | Path, parts: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{relative/posix/path: {sha256, bytes}}`` for every file under the given part directories of ``root``."""
    root = Path(root)
    files = {}
    for part in parts:
        for path in sorted((root / part).rglob("*")):
            if path.is_file():
                files[path.relative_to(root).as_posix()] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return files


def check_manifest(root: str | Path, files: dict[str, dict[str, Any]], parts: Iterable[str]) -> None:
    """Refuse a model dir whose part files differ from the manifest: missing, altered, extra or pickle files."""
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
    for name in sorted(expected):
        if sha256_file(root / name) != files[name]["sha256"]:
            raise ExportError(f"{root}: {name} does not match its sha256 in {META_FILE} (corrupt or altered)")


def zip_dir(src: str | Path, zip_path: str | Path, max_mb: float = 500.0, include: Sequence[str] | None = None) -> Path:
    """Zip ``src`` (or only its top-level entries named in ``include``) into ``zip_path``; refuse, and leave
    nothing behind, when the zip exceeds ``max_mb``."""
    src, zip_path = Path(src), Path(zip_path)
    roots = [src / name for name in include] if include is not None else [src]
    with atomic_path(zip_path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for root in roots:
                for path in [root] if root.is_file() else sorted(root.rglob("*")):
                    if path.is_file():
                        zf.write(path, path.relative_to(src).as_posix())
        size_mb = tmp.stat().st_size / 2**20
        if size_mb > max_mb:
            raise ExportError(
                f"{zip_path.name} would be {size_mb:.1f} MB, over the export.max_size_mb="
                f"{max_mb:g} limit; raise the limit or zip fewer parts (export.zip_parts)"
            )
    return zip_path


def _unsafe_reason(info: zipfile.ZipInfo) -> str | None:
    name = info.filename
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in parts:
        return "parent-directory component"
    if (info.external_attr >> 16) & 0o170000 == 0o120000:
        return "symbolic link"
    return None


def safe_extract(zip_path: str | Path, dest: str | Path, max_mb: float | None = None) -> Path:
    """Extract after checking every entry: no absolute or drive paths, no ``..``, no links, nothing resolving
    outside ``dest``, and (with ``max_mb``) no more uncompressed bytes than that (zip bombs)."""
    dest = Path(dest).resolve()
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as err:
        raise ExportError(f"{zip_path}: not a readable zip file ({err})") from err
    with zf:
        total = 0
        for info in zf.infolist():
            reason = _unsafe_reason(info)
            if reason is None and not (dest / info.filename).resolve().is_relative_to(dest):
                reason = "resolves outside the target directory"
            if reason:
                raise ExportError(f"{zip_path}: refusing entry {info.filename!r} ({reason})")
            total += info.file_size
        if max_mb is not None and total > max_mb * 2**20:
            raise ExportError(f"{zip_path}: {total / 2**20:.1f} MB uncompressed, over the {max_mb:g} MB limit")
        zf.extractall(dest)
    return dest


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
    atomic_write_json(out_dir / META_FILE, meta)
    log.info("exported %s to %s", ", ".join(written), out_dir)
    return meta
