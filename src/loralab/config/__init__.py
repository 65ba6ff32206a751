"""Typed configs: ``check`` types the composed config by its task's schema and applies every rule (one line on
failure); ``resolve_hardware`` fills a profile's ``auto`` values; ``typed`` hands back the dataclass instances the
run reads. (The YAML's resolvers are registered by ``import loralab``.)

    cfg = check(cfg)                        # right after composition, before anything loads
    cfg, changed = resolve_hardware(cfg)    # {"hardware.device": "cuda", ...}: log it, save the config
    conf = typed(cfg)                       # a ClassificationConf (...): conf.trainer.max_epochs, conf.output_names()
"""

from loralab.config.check import check, typed
from loralab.config.hardware import resolve_hardware
from loralab.config.schema import RunConf
from loralab.errors import ConfigError

__all__ = ["ConfigError", "RunConf", "check", "resolve_hardware", "typed"]
