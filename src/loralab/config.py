"""Checking the composed config before anything heavy happens.

Every rule fails with one line naming the key, the value and the rule, so a typo in a sweep costs seconds,
not a model download.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, ListConfig

from loralab.errors import ConfigError
from loralab.metrics import is_rule

log = logging.getLogger(__name__)


def _fail(key: str, value: Any, rule: str) -> None:
    raise ConfigError(f"{key}={value!r}: {rule}")


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        _fail(key, value, rule)


def accumulation_steps(batch_size: int, micro_batch_size: int | None) -> int:
    """Micro-batches per optimizer step, so ``optim.batch_size`` means the same on every hardware profile."""
    if micro_batch_size is None or micro_batch_size >= batch_size:
        return 1
    if batch_size % micro_batch_size:
        raise ConfigError(f"optim.batch_size={batch_size!r}: not divisible by hardware.micro_batch_size="
                          f"{micro_batch_size}; pick a batch size that is a multiple of it")
    return batch_size // micro_batch_size


def enable_lora_if_asked(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """A lora.* key set on the command line (a sweep over lora.r, say) means the user wants LoRA, also where the
    model's default is full fine-tuning (tiny_qwen2). Say so loudly rather than ignore the key."""
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    asked = [k for k in keys if k.startswith("lora.") and k != "lora.enabled"]
    if asked and not cfg.lora.enabled and "lora.enabled" not in keys:
        log.warning("LoRA turned on because %s was set (model=%s defaults to full fine-tuning); "
                    "pass lora=none without lora.* keys to train fully", ", ".join(asked), cfg.model.name)
        cfg.lora.enabled = True


def check_lora(cfg: DictConfig) -> None:
    if not cfg.lora.enabled:
        return
    _check(cfg.lora.r > 0, "lora.r", cfg.lora.r, "must be > 0")
    _check(cfg.lora.lora_alpha > 0, "lora.lora_alpha", cfg.lora.lora_alpha, "must be > 0")
    _check(0 <= cfg.lora.lora_dropout < 1, "lora.lora_dropout", cfg.lora.lora_dropout, "must be in [0, 1)")
    _check(len(cfg.lora.target_modules) > 0, "lora.target_modules", cfg.lora.target_modules, "must not be empty")


def check_model(cfg: DictConfig) -> None:
    m = cfg.model
    _check(m.max_length > 0, "model.max_length", m.max_length, "must be > 0")
    _check(m.truncation_side in ("left", "right"), "model.truncation_side", m.truncation_side, "must be left or right")
    _check(m.pretrained or m.arch, "model.arch", m.arch, "pretrained=false needs a shipped architecture name")


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError on the first broken rule."""
    d = cfg.data
    labels = d.labels
    _check(isinstance(labels, (list, ListConfig)) and len(labels) > 0, "data.labels", labels, "must be a non-empty list")
    _check(all(isinstance(x, str) and x for x in labels), "data.labels", list(labels), "labels must be non-empty strings")
    _check(len(set(labels)) == len(labels), "data.labels", list(labels), "labels must be unique")
    if not d.get("demo"):
        _check(Path(d.train_file).is_file(), "data.train_file", d.train_file, "file not found")
        if d.val_file:
            _check(Path(d.val_file).is_file(), "data.val_file", d.val_file, "file not found")
    if not d.val_file:
        _check(0 < d.val_split < 1, "data.val_split", d.val_split, "must be in (0, 1)")
    if d.oversample_below is not None:
        _check(0 < d.oversample_below <= 1, "data.oversample_below", d.oversample_below, "must be in (0, 1] or null")
    _check(d.leakage in ("warn", "drop", "error"), "data.leakage", d.leakage, "must be warn, drop or error")
    _check("{features}" in d.template, "data.template", d.template, "must contain {features}")

    _check(cfg.loss.gamma >= 0, "loss.gamma", cfg.loss.gamma, "must be >= 0")
    cw = cfg.loss.class_weights
    if isinstance(cw, (list, ListConfig)):
        _check(len(cw) == len(labels), "loss.class_weights", list(cw), f"needs one weight per label ({len(labels)})")
        _check(all(isinstance(w, (int, float)) and w >= 0 for w in cw), "loss.class_weights", list(cw),
               "weights must be numbers >= 0")
    else:
        _check(cw in ("auto", "sqrt_inverse", "none", None), "loss.class_weights", cw,
               "must be auto, sqrt_inverse, none or a list of numbers")

    check_lora(cfg)

    o = cfg.optim
    _check(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    _check(isinstance(o.batch_size, int) and o.batch_size > 0, "optim.batch_size", o.batch_size, "must be an int > 0")
    _check(0 <= o.warmup_ratio < 1, "optim.warmup_ratio", o.warmup_ratio, "must be in [0, 1)")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    if o.max_grad_norm is not None:
        _check(o.max_grad_norm > 0, "optim.max_grad_norm", o.max_grad_norm, "must be > 0 or null")

    t = cfg.trainer
    _check(isinstance(t.max_epochs, int) and t.max_epochs >= 1, "trainer.max_epochs", t.max_epochs, "must be an int >= 1")
    _check(t.early_stopping.patience >= 0, "trainer.early_stopping.patience", t.early_stopping.patience, "must be >= 0")
    _check(t.monitor_mode in ("max", "min"), "trainer.monitor_mode", t.monitor_mode, "must be max or min")
    known = {"val_macro_f1", "val_accuracy", "val_loss", *(f"val_{m}_{label}" for m in ("precision", "recall", "f1")
                                                          for label in labels)}
    rule = "must be val_macro_f1, val_accuracy, val_loss or val_<precision|recall|f1>_<label>"
    _check(t.monitor in known, "trainer.monitor", t.monitor, rule)
    _check(cfg.objective in known, "objective", cfg.objective, rule)
    for metric, gate in (t.gates or {}).items():
        _check(is_rule(gate), f"trainer.gates.{metric}", gate, "must be '<op> <number>' with op in >=, >, <=, <")
    _check(isinstance(t.save_top_k, int) and t.save_top_k >= 1, "trainer.save_top_k", t.save_top_k,
           "must be an int >= 1 (the best epoch is reloaded from it)")
    _check(t.eval_batch_size > 0, "trainer.eval_batch_size", t.eval_batch_size, "must be > 0")

    h = cfg.hardware
    _check(h.precision in ("fp32", "bf16", "fp16"), "hardware.precision", h.precision, "must be fp32, bf16 or fp16")
    if h.micro_batch_size is not None:
        _check(h.micro_batch_size > 0, "hardware.micro_batch_size", h.micro_batch_size, "must be > 0 or null")
    accumulation_steps(o.batch_size, h.micro_batch_size)
    _check(h.preflight in ("error", "warn", "off"), "hardware.preflight", h.preflight, "must be error, warn or off")
    if h.load_in_4bit:
        _check(str(h.device).startswith("cuda"), "hardware.load_in_4bit", True,
               f"4-bit (bitsandbytes) needs a CUDA device, hardware.device is {h.device}")
        _check(cfg.lora.enabled, "hardware.load_in_4bit", True, "4-bit base weights train only with LoRA (QLoRA)")
        _check(cfg.model.pretrained, "hardware.load_in_4bit", True, "needs model.pretrained=true")
    if str(h.device).startswith("cuda"):
        import torch

        _check(torch.cuda.is_available(), "hardware.device", h.device,
               "CUDA is not available here; use hardware=cpu or hardware=auto")
    check_model(cfg)
    _check(cfg.export.max_size_mb > 0, "export.max_size_mb", cfg.export.max_size_mb, "must be > 0")
    if cfg.get("baseline") is not None:
        _check(cfg.baseline.name in ("hgb", "logreg"), "baseline.name", cfg.baseline.name,
               "must be hgb or logreg (baseline=none switches the baseline off)")
    c = cfg.calibration
    _check(c.method in ("temperature", "none"), "calibration.method", c.method, "must be temperature or none")
    _check(isinstance(c.n_bins, int) and c.n_bins >= 1, "calibration.n_bins", c.n_bins, "must be an int >= 1")
    _check(len(c.t_bounds) == 2 and 0 < c.t_bounds[0] < 1 < c.t_bounds[1], "calibration.t_bounds", list(c.t_bounds),
           "must be [lo, hi] with 0 < lo < 1 < hi")
    if cfg.export.zip_parts != "auto":
        parts = list(cfg.export.zip_parts)
        _check(set(parts) <= {"merged", "adapter", "base", "loralab.json"}, "export.zip_parts", parts,
               "allowed parts: auto, or a list of merged, adapter, base, loralab.json")
        _check("loralab.json" in parts and bool({"merged", "adapter"} & set(parts)), "export.zip_parts", parts,
               "needs loralab.json and merged or adapter (or the zip cannot be loaded)")
    _check(cfg.export.verify_rows >= 1, "export.verify_rows", cfg.export.verify_rows, "must be >= 1")
    _check(cfg.export.verify_atol >= 0, "export.verify_atol", cfg.export.verify_atol, "must be >= 0")


# TEMPORARY (lead's branch): replaced by the config helper's package at merge.
def check(cfg: DictConfig) -> DictConfig:
    if cfg.task.name == "classification":
        validate(cfg)
    else:
        from loralab.regression_config_tmp import validate_tabular, validate_text

        {"text_regression": validate_text, "tabular_regression": validate_tabular}[cfg.task.name](cfg)
    return cfg


def resolve_hardware(cfg: DictConfig):
    from omegaconf import OmegaConf, open_dict

    from loralab.core.memory import resolve_auto

    before = OmegaConf.to_container(cfg.hardware, resolve=True)
    after = resolve_auto(before)
    with open_dict(cfg):
        cfg.hardware = after
    return cfg, {k: v for k, v in after.items() if before.get(k) != v}
