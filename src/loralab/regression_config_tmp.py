"""Config rules of the regression tasks, checked before any data or model is loaded (one line: key, value, rule)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, ListConfig

from loralab.config import _check, accumulation_steps, check_lora, check_model
from loralab.metrics import metric_names


def _names(key: str, value, allow_null: bool = False) -> None:
    if value is None and allow_null:
        return
    ok = isinstance(value, (list, ListConfig)) and len(value) > 0 and all(isinstance(x, str) and x for x in value)
    _check(ok, key, value, "must be a non-empty list of non-empty strings" + (" or null" if allow_null else ""))
    _check(len(set(value)) == len(value), key, list(value), "names must be unique")


def _files(d: DictConfig, keys: tuple[str, ...]) -> None:
    if d.get("demo"):
        return  # written on first use
    for key in keys:
        _check(d[key] is not None and Path(d[key]).is_file(), f"data.{key}", d[key], "file not found")


def _common(cfg: DictConfig) -> None:
    o, t = cfg.optim, cfg.trainer
    _check(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _check(isinstance(o.batch_size, int) and o.batch_size > 0, "optim.batch_size", o.batch_size, "must be an int > 0")
    _check(0 <= o.warmup_ratio < 1, "optim.warmup_ratio", o.warmup_ratio, "must be in [0, 1)")
    if o.max_grad_norm is not None:
        _check(o.max_grad_norm > 0, "optim.max_grad_norm", o.max_grad_norm, "must be > 0 or null")
    _check(isinstance(t.max_epochs, int) and t.max_epochs >= 1, "trainer.max_epochs", t.max_epochs,
           "must be an int >= 1")
    _check(isinstance(t.early_stopping.patience, int) and t.early_stopping.patience >= 0,
           "trainer.early_stopping.patience", t.early_stopping.patience, "must be an int >= 0")
    _check(t.early_stopping.min_delta >= 0, "trainer.early_stopping.min_delta", t.early_stopping.min_delta,
           "must be >= 0")
    _check(t.monitor_mode in ("max", "min"), "trainer.monitor_mode", t.monitor_mode, "must be max or min")
    _check(t.eval_batch_size > 0, "trainer.eval_batch_size", t.eval_batch_size, "must be > 0")
    threads = cfg.hardware.get("torch_threads")
    _check(threads is None or (isinstance(threads, int) and threads >= 1), "hardware.torch_threads", threads,
           "must be an int >= 1 or null")
    _check(cfg.hardware.precision in ("fp32", "bf16", "fp16"), "hardware.precision", cfg.hardware.precision,
           "must be fp32, bf16 or fp16")


def _monitor(cfg: DictConfig, names) -> None:
    allowed = ["val_loss", *metric_names(names if names is not None else [])]
    monitor = cfg.trainer.monitor
    if names is None:  # dimensions come from the data: only the prefix can be checked now
        ok = monitor in allowed or any(monitor.startswith(f"val_{s}_") for s in ("mse", "mae", "rmse", "r2"))
    else:
        ok = monitor in allowed
    _check(ok, "trainer.monitor", monitor, f"must be one of {allowed[:5]} or val_<mse|mae|rmse|r2>_<target>")


def validate_tabular(cfg: DictConfig) -> None:
    """MarketSentinel: HDF5 + schema inputs, MLP, summed per-head MSE."""
    d = cfg.data
    _files(d, ("train_file", "val_file", "schema_file"))
    _names("data.target_names", d.target_names)
    m = cfg.model
    _check(isinstance(m.hidden_dim, int) and m.hidden_dim > 0, "model.hidden_dim", m.hidden_dim, "must be an int > 0")
    _check(cfg.hardware.precision == "fp32", "hardware.precision", cfg.hardware.precision,
           "the MLP trains in fp32 (mixed precision buys nothing at this size)")
    _common(cfg)
    _monitor(cfg, list(d.target_names))


def validate_text(cfg: DictConfig) -> None:
    """Article scoring: JSONL articles, Qwen2 regression head, LoRA or full fine-tuning."""
    d = cfg.data
    _files(d, ("train_file",) + (("val_file",) if d.val_file else ()))
    if not d.val_file:
        _check(0 < d.val_split < 1, "data.val_split", d.val_split, "must be in (0, 1)")
    _names("data.dimension_names", d.dimension_names, allow_null=True)
    _check("{title}" in d.template or "{content}" in d.template, "data.template", d.template,
           "must contain {title} and/or {content}")
    _check(d.leakage in ("warn", "drop", "error"), "data.leakage", d.leakage, "must be warn, drop or error")
    _check(isinstance(d.score_tiers, int) and d.score_tiers >= 1, "data.score_tiers", d.score_tiers,
           "must be an int >= 1")
    check_model(cfg)
    check_lora(cfg)
    _common(cfg)
    if cfg.hardware.micro_batch_size is not None:
        _check(cfg.hardware.micro_batch_size > 0, "hardware.micro_batch_size", cfg.hardware.micro_batch_size,
               "must be > 0 or null")
    accumulation_steps(cfg.optim.batch_size, cfg.hardware.micro_batch_size)
    _check(cfg.export.max_size_mb > 0, "export.max_size_mb", cfg.export.max_size_mb, "must be > 0")
    _monitor(cfg, list(d.dimension_names) if d.dimension_names is not None else None)
