"""``auto`` in a hardware profile, filled in one place from what torch sees, and said: the caller logs the
changes and saves the resulting config with the run."""

from __future__ import annotations

import copy
from typing import Any, Mapping

from omegaconf import DictConfig

from loralab.config.check import check
from loralab.core.device import resolve_device

GIB = 2**30
SMALL_GPU_GIB = 12  # under this: micro-batch 4 and gradient checkpointing


def auto_values(hw: Mapping[str, Any]) -> dict[str, Any]:
    """The value each ``auto`` key of a hardware group takes on this machine (only those keys)."""
    import torch

    cuda = torch.cuda.is_available()
    device = resolve_device("auto").type if hw["device"] == "auto" else str(hw["device"])
    on_cuda = device.startswith("cuda") and cuda
    mem_gib = torch.cuda.get_device_properties(0).total_memory / GIB if on_cuda else None
    small = mem_gib is not None and mem_gib < SMALL_GPU_GIB
    values = {
        "device": device,
        "memory_gib": mem_gib,
        "precision": ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if on_cuda else "fp32",
        "micro_batch_size": (4 if small else 32) if device.startswith("cuda") else None,
        "gradient_checkpointing": small,
        "pin_memory": device.startswith("cuda"),
    }
    return {k: v for k, v in values.items() if hw.get(k) == "auto"}


def resolve_hardware(cfg: DictConfig) -> tuple[DictConfig, dict[str, Any]]:
    """``cfg`` (as ``check`` returned it) with ``hardware`` ``auto`` values filled, checked again (the device
    rules and the batch split read them), and ``{"hardware.<key>": value}`` for what changed."""
    changes = auto_values(cfg.hardware)
    if not changes:  # nothing was auto: cfg is already checked
        return cfg, {}
    out = copy.deepcopy(cfg)
    for key, value in changes.items():
        out.hardware[key] = value
    return check(out), {f"hardware.{k}": v for k, v in changes.items()}
