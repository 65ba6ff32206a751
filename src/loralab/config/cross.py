"""Rules that read more than one key, the same for every task. Each takes the typed config and the task class and
raises ``ConfigError`` (one line); ``check`` runs them in order after the types and the field rules hold, so they
may trust both, then the task's own (``Task.check``)."""

from __future__ import annotations

from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from loralab.config.tasks import QwenModelConf
from loralab.core.sampler import accumulation_steps  # the one rule the trainer applies too
from loralab.data.records import unreadable
from loralab.errors import ConfigError


def fail(key: str, value: Any, rule: str) -> None:
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    raise ConfigError(f"{key}={value!r}: {rule}")


def require(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        fail(key, value, rule)


def data_files(cfg: DictConfig, task: Any) -> None:
    d = cfg.data
    # Demo files are written on first use; no demo writes a test file.
    keys = ("test_file",) if d.demo else [k for k in d.keys() if str(k).endswith("_file")]
    for key in keys:
        if d.get(key) is not None:
            problem = unreadable(d[key])  # a directory, missing, or no permission: say which
            require(problem is None, f"data.{key}", d[key], problem or "")


def is_qwen(cfg: DictConfig) -> bool:
    """The run's model is a transformers (Qwen2-class) model, not the MLP: LoRA, 4-bit and pretraining apply."""
    return issubclass(OmegaConf.get_type(cfg.model) or object, QwenModelConf)


def lora(cfg: DictConfig, task: Any) -> None:
    lo = cfg.lora
    require(
        not lo.enabled or lo.r is not None,
        "lora.r",
        lo.r,
        "LoRA needs a rank (e.g. lora.r=8); lora=none trains every weight instead",
    )
    require(
        not lo.enabled or is_qwen(cfg), "lora.enabled", lo.enabled, "the MLP trains fully; LoRA applies to Qwen2 models"
    )


def pretrain(cfg: DictConfig, task: Any) -> None:
    p = cfg.pretrain
    if p.name == "none":
        return
    require(
        task.reads_text and is_qwen(cfg),
        "pretrain",
        p.name,
        "continued pretraining needs a text model; the MLP has no texts (pretrain=none)",
    )
    require(
        bool(p.splits) or bool(p.extra_files),
        "pretrain.splits",
        list(p.splits),
        "no texts to pretrain on: name a split (train) or pretrain.extra_files",
    )
    for i, path in enumerate(p.extra_files):
        problem = unreadable(path)
        require(problem is None, f"pretrain.extra_files.{i}", path, problem or "")


def model(cfg: DictConfig, task: Any) -> None:
    if not is_qwen(cfg):
        return
    m = cfg.model
    require(
        m.pretrained or bool(m.arch),
        "model.arch",
        m.arch,
        "pretrained=false needs a shipped architecture name or a local config.json / model dir",
    )
    require(
        not m.pretrained or bool(m.hub_id or m.path),
        "model.hub_id",
        m.hub_id,
        "pretrained=true needs model.hub_id or model.path",
    )


def monitor(cfg: DictConfig, task: Any) -> None:
    names = task.metric_names(cfg)  # loralab.metrics.MetricNames
    for key in ("trainer.monitor", "objective"):
        name = OmegaConf.select(cfg, key)
        require(name in names, key, name, names.rule)
    name, mode = cfg.trainer.monitor, cfg.trainer.monitor_mode
    lower_is_better = name == "val_loss" or any(name.startswith(f"val_{s}") for s in ("mse", "mae", "rmse"))
    require(
        mode == ("min" if lower_is_better else "max"),
        "trainer.monitor_mode",
        mode,
        f"{name} is {'an error' if lower_is_better else 'a score'}: must be {'min' if lower_is_better else 'max'}",
    )


def batch(cfg: DictConfig, task: Any) -> None:
    micro = cfg.hardware.micro_batch_size
    if micro != "auto":
        accumulation_steps(cfg.optim.batch_size, micro)


def hardware(cfg: DictConfig, task: Any) -> None:
    """Device rules; ``auto`` values pass here and are checked again once ``resolve_hardware`` filled them."""
    h = cfg.hardware
    on_cuda = str(h.device).startswith("cuda")
    if h.load_in_4bit:
        require(
            on_cuda or h.device == "auto",
            "hardware.load_in_4bit",
            True,
            f"4-bit (bitsandbytes) needs a CUDA device, hardware.device is {h.device}",
        )
        require(
            cfg.lora.enabled is True, "hardware.load_in_4bit", True, "4-bit base weights train only with LoRA (QLoRA)"
        )
        require(is_qwen(cfg) and cfg.model.pretrained, "hardware.load_in_4bit", True, "needs model.pretrained=true")
    if h.packing:
        require(is_qwen(cfg), "hardware.packing", True, "packs a text model's records; the MLP reads no token sequence")
    if on_cuda:
        import torch

        require(
            torch.cuda.is_available(),
            "hardware.device",
            h.device,
            "CUDA is not available here; use hardware=cpu or hardware=auto",
        )
    if not is_qwen(cfg):
        require(
            h.precision in ("fp32", "auto"),
            "hardware.precision",
            h.precision,
            "the MLP trains in fp32 (mixed precision buys nothing at this size)",
        )


def ensemble(cfg: DictConfig, task: Any) -> None:
    if cfg.ensemble is None:
        return
    require(
        task.blends,
        "ensemble",
        "blend",
        f"blends a classifier's probabilities; this run's task is {cfg.task.name} (use ensemble=none)",
    )
    require(
        cfg.baseline is not None,
        "ensemble",
        "blend",
        "needs the in-run baseline to blend with (baseline=hgb or logreg, not none)",
    )
    parts = cfg.export.zip_parts
    require(
        parts == "auto" or "baseline" in parts,
        "export.zip_parts",
        parts,
        "ensemble=blend serves the blend: the zip needs baseline (its skops file)",
    )


def decision(cfg: DictConfig, task: Any) -> None:
    d = cfg.decision
    if d is None:
        return
    require(
        task.blends,  # the task's outputs are class probabilities
        "decision",
        str(d.method),
        f"thresholds a classifier's probabilities; this run's task is {cfg.task.name} (use decision=argmax)",
    )
    labels = list(cfg.data.labels)
    require(d.fallback in labels, "decision.fallback", d.fallback, f"must be one of data.labels {labels}")
    for label in d.targets:
        require(label in labels, f"decision.targets.{label}", d.targets[label], f"names no label of {labels}")
        require(
            label != d.fallback,
            f"decision.targets.{label}",
            d.targets[label],
            f"{label} is decision.fallback, answered when no other label acts: it takes no target",
        )
    if cfg.ensemble is not None:
        require(
            d.folds == cfg.ensemble.folds,
            "decision.folds",
            d.folds,
            f"must equal ensemble.folds={cfg.ensemble.folds}: the thresholds are cross-fit on the blend's folds",
        )


# Each rule takes the typed config and the run's task class (``task._target_``: its ``metric_names``, whether it
# ``reads_text`` or ``blends``); the task's own rules (``Task.check``) run after these.
RULES: tuple[Callable[[DictConfig, Any], None], ...] = (
    data_files,
    lora,
    pretrain,
    model,
    monitor,
    batch,
    hardware,
    ensemble,
    decision,
)
