"""loralab-train (and ``python train.py``): one experiment, or a sweep with -m. A Hydra app over the packaged conf/.

Exit codes: 0 done, 2 bad config/data/checkpoint (one line), 3 non-finite training, 130 interrupted (resumable).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from loralab.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError, TrainingInterrupted
from loralab.fs import writable_dir
from loralab.paths import conf_dir

log = logging.getLogger("loralab")


class CheckRunDir(Callback):
    """Hydra creates the run (sweep) dir before any loralab code runs, and an unusable one ended in its traceback:
    probe it first (``hydra.callbacks`` in conf/hydra/default.yaml), one line and exit 2."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.probe(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.probe(config.hydra.sweep.dir, "hydra.sweep.dir")

    @staticmethod
    def probe(directory: str, key: str) -> None:
        try:
            writable_dir(directory, key)
        except ConfigError as err:
            print(f"ConfigError: {err}", file=sys.stderr)
            sys.exit(2)


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="train")
def main(cfg: DictConfig) -> float:
    # Imported here, not at the top: the training stack (torch, transformers, peft, mlflow: ~6 s of CPU) loads only
    # once the config composed, so a mistyped key or an unusable run dir is answered in about a second.
    from loralab.lifecycle import run
    from loralab.tracking.sweep import is_multirun

    try:
        return run(cfg)
    except TrainingInterrupted as err:  # stops a sweep too: Ctrl-C means stop
        log.error(
            "interrupted: %s. Resume with: python train.py %s resume=auto hydra.run.dir=%s",
            err,
            " ".join(HydraConfig.get().overrides.task),
            HydraConfig.get().runtime.output_dir,
        )
        sys.exit(130)
    except Exception as err:
        if is_multirun():
            # Hydra's sweepers abort the whole sweep on a raising job; this job's MLflow run is already FAILED
            # with the error, so hand the sweeper a NaN objective and let the other jobs go on.
            log.error(
                "job failed, sweep continues: %s: %s",
                type(err).__name__,
                err,
                exc_info=not isinstance(err, (ConfigError, DataError, CheckpointError)),
            )
            return float("nan")
        if isinstance(err, (ConfigError, DataError, CheckpointError)):
            log.error("%s: %s", type(err).__name__, err)
            sys.exit(2)
        if isinstance(err, NonFiniteLossError):
            log.error("training stopped: %s (best checkpoint kept in %s)", err, HydraConfig.get().runtime.output_dir)
            sys.exit(3)
        raise


def entry() -> None:
    """``loralab-train`` and ``python train.py``: the Hydra app, with an override of a key the config does not have
    (``lora.rank=16``, no ``+``) said like every other bad value, in one line with exit 2 (Hydra's own message is
    several lines and exit 1)."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra raises composition errors instead of printing them
    try:
        main()
    except ConfigCompositionException as err:
        print(f"ConfigError: {composition_error(err)}", file=sys.stderr)
        sys.exit(2)


def composition_error(err: ConfigCompositionException) -> str:
    """``key=value: unknown key (known: ...)`` for an override of a missing key, else Hydra's first line."""
    message = str(err)
    match = re.search(r"Could not override '([^']+)'.*use \+(\S+)", message, re.DOTALL)
    if match is None:
        return message.splitlines()[0]
    key, override = match.group(1), match.group(2)
    parent, value = key.rpartition(".")[0], override.split("=", 1)[1]
    others = [o for o in sys.argv[1:] if "=" in o and not o.startswith(("hydra.", "-")) and o.split("=")[0] != key]
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            node = OmegaConf.select(compose("train", overrides=others), parent) if parent else None
        known = [str(k) for k in node.keys() if not str(k).startswith("_")] if OmegaConf.is_dict(node) else []
    except Exception:  # the other overrides do not compose on their own (sweep lists): no list, still one line
        known = []
    listed = f" (known: {', '.join(known)})" if known else ""
    return f"{key}={value}: unknown key{listed}"


if __name__ == "__main__":
    entry()
