"""The one place a device name (``auto``, ``cpu``, ``cuda``, ``cuda:1``) becomes a ``torch.device``, and ``auto``
becomes a choice (``config.resolve_hardware`` asks here too)."""

from __future__ import annotations

import torch

from loralab.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` is the GPU when there is one, else the CPU. A CUDA device this machine lacks fails here, with the
    fix in the message, instead of deep inside the first ``.to()``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device={name}: not a torch device (auto, cpu, cuda, cuda:N)") from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"device={name}: CUDA is not available here (torch {torch.__version__}, CUDA build "
                f"{torch.version.cuda}); use cpu or auto"
            )
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device={name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device
