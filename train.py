"""Train one experiment: python train.py [group=option] [key=value ...]; add -m for a sweep."""

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

os.environ.setdefault("LORALAB_ROOT", str(Path(__file__).resolve().parent))

from loralab.core.checkpoint import CheckpointError  # noqa: E402
from loralab.config import ConfigError  # noqa: E402
from loralab.data.records import DataError  # noqa: E402
from loralab.core.trainer import NonFiniteLossError, TrainingInterrupted  # noqa: E402
from loralab.run import train  # noqa: E402
from loralab.tracking.sweep import is_multirun  # noqa: E402

log = logging.getLogger("loralab")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        return train(cfg)
    except TrainingInterrupted as err:  # stops a sweep too: Ctrl-C means stop
        log.error("interrupted: %s. Resume with: python train.py %s resume=auto hydra.run.dir=%s", err,
                  " ".join(HydraConfig.get().overrides.task), cfg.paths.output_dir)
        sys.exit(130)
    except Exception as err:
        if is_multirun():
            # Hydra's sweepers abort the whole sweep on a raising job; this job's MLflow run is already FAILED
            # with the error, so hand the sweeper a NaN objective and let the other jobs go on.
            log.error("job failed, sweep continues: %s: %s", type(err).__name__, err,
                      exc_info=not isinstance(err, (ConfigError, DataError)))
            return float("nan")
        if isinstance(err, (ConfigError, DataError, CheckpointError)):
            log.error("%s: %s", type(err).__name__, err)
            sys.exit(2)
        if isinstance(err, NonFiniteLossError):
            log.error("training stopped: %s (best checkpoint kept in %s)", err, cfg.paths.output_dir)
            sys.exit(3)
        raise


if __name__ == "__main__":
    main()
