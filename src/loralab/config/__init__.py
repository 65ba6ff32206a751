"""Typed configs: ``check`` types the composed config by its task's schema and applies every rule (one line on
failure); ``resolve_hardware`` fills a profile's ``auto`` values. Importing this package registers the resolvers
the YAML uses (``${loralab.is_set:...}``), so import it before a config is resolved.

    cfg = check(cfg)                        # right after composition, before anything loads
    cfg, changed = resolve_hardware(cfg)    # {"hardware.device": "cuda", ...}: log it, save the config
"""

from omegaconf import OmegaConf

from loralab.config.check import check
from loralab.config.cross import accumulation_steps
from loralab.config.hardware import resolve_hardware
from loralab.errors import ConfigError

# conf/lora: `enabled: ${loralab.is_set:${.r}}`, so a rank typed on the command line (lora.r=16, a sweep over it)
# turns LoRA on also where the model's default is full fine-tuning, and r: null (lora=none) turns it off.
OmegaConf.register_new_resolver("loralab.is_set", lambda value: value is not None, replace=True)

__all__ = ["ConfigError", "accumulation_steps", "check", "resolve_hardware"]
