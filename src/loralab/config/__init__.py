"""Typed configs: ``check`` types the composed config by its task's schema and applies every rule (one line on
failure); ``resolve_hardware`` fills a profile's ``auto`` values. (The YAML's resolvers are registered by ``import loralab``.)

    cfg = check(cfg)                        # right after composition, before anything loads
    cfg, changed = resolve_hardware(cfg)    # {"hardware.device": "cuda", ...}: log it, save the config
"""

from loralab.config.check import check
from loralab.config.hardware import resolve_hardware
from loralab.errors import ConfigError

__all__ = ["ConfigError", "check", "resolve_hardware"]
