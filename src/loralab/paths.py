"""Where loralab's Hydra configs are, and the resolver they use: ``${loralab.cwd:}``.

There are two places for ``conf/``: a built wheel carries it as ``loralab/conf`` (force-included at build time), while a
source checkout or an editable install reads the repository's top-level ``conf/`` directly, so that one directory
stays the only copy anybody edits.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from omegaconf import OmegaConf

CWD_RESOLVER = "loralab.cwd"


def conf_dir() -> Path:
    """The directory holding ``train.yaml`` and the config groups: installed package first, then the checkout."""
    packaged = resources.files("loralab") / "conf"
    if packaged.is_dir():
        return Path(str(packaged))
    checkout = Path(__file__).resolve().parents[2] / "conf"  # src/loralab/paths.py -> <repo>/conf
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(f"loralab configs not found: neither {packaged} nor {checkout} exists (broken install?)")


def register_resolvers() -> None:
    """``${loralab.cwd:}``: the absolute current directory, so outputs, MLflow and data land where the user runs
    loralab (Hydra's ``${hydra:runtime.cwd}`` is unset under the compose API that tests and the preflight use)."""
    if not OmegaConf.has_resolver(CWD_RESOLVER):
        OmegaConf.register_new_resolver(CWD_RESOLVER, os.getcwd)
