"""Rules that read more than one key. Each takes the typed config and raises ``ConfigError`` (one line); ``check``
runs them in order after the types and the field rules hold, so they may trust both."""

from __future__ import annotations

from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from loralab.core.loaders import accumulation_steps  # the one rule the trainer applies too
from loralab.data.records import unreadable
from loralab.errors import ConfigError

REGRESSION_SCORES = ("mse", "mae", "rmse", "r2")


def fail(key: str, value: Any, rule: str) -> None:
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    raise ConfigError(f"{key}={value!r}: {rule}")


def require(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        fail(key, value, rule)


def data_files(cfg: DictConfig) -> None:
    d = cfg.data
    # Demo files are written on first use; no demo writes a test file.
    keys = ("test_file",) if d.demo else ("train_file", "val_file", "schema_file", "test_file")
    for key in keys:
        if d.get(key) is not None:
            problem = unreadable(d[key])  # a directory, missing, or no permission: say which
            require(problem is None, f"data.{key}", d[key], problem or "")


def columns(cfg: DictConfig) -> None:
    d = cfg.data
    if "id_column" in d:
        require(d.id_column != d.label_column, "data.label_column", d.label_column,
                "must differ from data.id_column")


def class_weights(cfg: DictConfig) -> None:
    weights, labels = cfg.loss.get("class_weights"), cfg.data.get("labels")
    if OmegaConf.is_list(weights):
        require(len(weights) == len(labels), "loss.class_weights", weights,
                f"needs one weight per label ({len(labels)})")


def lora(cfg: DictConfig) -> None:
    lo = cfg.lora
    require(not lo.enabled or lo.r is not None, "lora.r", lo.r, "LoRA needs a rank (e.g. lora.r=8); lora=none "
            "trains every weight instead")
    if cfg.task.name == "tabular_regression":
        require(not lo.enabled, "lora.enabled", lo.enabled, "the MLP trains fully; LoRA applies to Qwen2 models")


def pretrain(cfg: DictConfig) -> None:
    p = cfg.pretrain
    if p.name == "none":
        return
    require(cfg.task.name != "tabular_regression", "pretrain", p.name,
            "continued pretraining needs a text model; the MLP has no texts (pretrain=none)")
    require(bool(p.splits) or bool(p.extra_files), "pretrain.splits", list(p.splits),
            "no texts to pretrain on: name a split (train) or pretrain.extra_files")
    for i, path in enumerate(p.extra_files):
        problem = unreadable(path)
        require(problem is None, f"pretrain.extra_files.{i}", path, problem or "")


def model(cfg: DictConfig) -> None:
    m = cfg.model
    if "pretrained" in m:
        require(m.pretrained or bool(m.arch), "model.arch", m.arch,
                "pretrained=false needs a shipped architecture name or a local config.json / model dir")
        require(not m.pretrained or bool(m.hub_id or m.path), "model.hub_id", m.hub_id,
                "pretrained=true needs model.hub_id or model.path")


def monitor_names(cfg: DictConfig) -> tuple[set[str], Callable[[str], bool], str]:
    """The metric names a run of this task reports: (known names, a test for names known only later, rule text)."""
    d = cfg.data
    if cfg.task.name == "classification":
        labels = list(d.labels)
        known = {"val_macro_f1", "val_accuracy", "val_loss",
                 *(f"val_{m}_{label}" for m in ("precision", "recall", "f1") for label in labels)}
        rule = "must be val_macro_f1, val_accuracy, val_loss or val_<precision|recall|f1>_<label>"
        return known, lambda name: False, rule
    from loralab.metrics import metric_names  # sklearn: imported only when a config is checked

    names = d.get("target_names", d.get("dimension_names"))
    known = {"val_loss", *metric_names(list(names) if names is not None else [])}
    later = (lambda name: any(name.startswith(f"val_{s}_") for s in REGRESSION_SCORES)) if names is None else (
        lambda name: False)  # dimensions come from the data: only the prefix can be checked now
    return known, later, f"must be one of {sorted(known)[:5]} or val_<{'|'.join(REGRESSION_SCORES)}>_<target>"


def monitor(cfg: DictConfig) -> None:
    known, later, rule = monitor_names(cfg)
    for key in ("trainer.monitor", "objective"):
        name = OmegaConf.select(cfg, key)
        require(name in known or later(name), key, name, rule)
    name, mode = cfg.trainer.monitor, cfg.trainer.monitor_mode
    lower_is_better = name == "val_loss" or any(name.startswith(f"val_{s}") for s in ("mse", "mae", "rmse"))
    require(mode == ("min" if lower_is_better else "max"), "trainer.monitor_mode", mode,
            f"{name} is {'an error' if lower_is_better else 'a score'}: must be {'min' if lower_is_better else 'max'}")


def batch(cfg: DictConfig) -> None:
    micro = cfg.hardware.micro_batch_size
    if micro != "auto":
        accumulation_steps(cfg.optim.batch_size, micro)


def hardware(cfg: DictConfig) -> None:
    """Device rules; ``auto`` values pass here and are checked again once ``resolve_hardware`` filled them."""
    h = cfg.hardware
    on_cuda = str(h.device).startswith("cuda")
    if h.load_in_4bit:
        require(on_cuda or h.device == "auto", "hardware.load_in_4bit", True,
                f"4-bit (bitsandbytes) needs a CUDA device, hardware.device is {h.device}")
        require(cfg.lora.enabled, "hardware.load_in_4bit", True, "4-bit base weights train only with LoRA (QLoRA)")
        require(cfg.model.get("pretrained", False), "hardware.load_in_4bit", True, "needs model.pretrained=true")
    if on_cuda:
        import torch

        require(torch.cuda.is_available(), "hardware.device", h.device,
                "CUDA is not available here; use hardware=cpu or hardware=auto")
    if cfg.task.name == "tabular_regression":
        require(h.precision in ("fp32", "auto"), "hardware.precision", h.precision,
                "the MLP trains in fp32 (mixed precision buys nothing at this size)")


def ensemble(cfg: DictConfig) -> None:
    if cfg.get("ensemble") is None:
        return
    require(cfg.task.name == "classification", "ensemble", "blend", f"blends a classifier's probabilities; this run's "
            f"task is {cfg.task.name} (use ensemble=none)")
    require(cfg.get("baseline") is not None, "ensemble", "blend", "needs the in-run baseline to blend with "
            "(baseline=hgb or logreg, not none)")
    parts = cfg.export.zip_parts
    require(parts == "auto" or "baseline" in parts, "export.zip_parts", parts,
            "ensemble=blend serves the blend: the zip needs baseline (its skops file)")


RULES: tuple[Callable[[DictConfig], None], ...] = (data_files, columns, class_weights, lora, pretrain, model, monitor,
                                                   batch, hardware, ensemble)
