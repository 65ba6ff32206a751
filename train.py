"""Train one experiment: python train.py [group=option] [key=value ...]; add -m for a sweep."""

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("LORALAB_ROOT", str(Path(__file__).resolve().parent))

from loralab.checkpoint import CheckpointError  # noqa: E402
from loralab.config import ConfigError  # noqa: E402
from loralab.data.records import DataError  # noqa: E402
from loralab.loop import NonFiniteLossError, TrainingInterrupted  # noqa: E402
from loralab.run import train  # noqa: E402

log = logging.getLogger("loralab")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        return train(cfg)
    except (ConfigError, DataError, CheckpointError) as err:
        log.error("%s: %s", type(err).__name__, err)
        sys.exit(2)
    except NonFiniteLossError as err:
        log.error("training stopped: %s (best checkpoint kept in %s)", err, cfg.paths.output_dir)
        sys.exit(3)
    except TrainingInterrupted as err:
        log.error("interrupted: %s. Resume with: python train.py %s resume=auto hydra.run.dir=%s", err,
                  " ".join(hydra.core.hydra_config.HydraConfig.get().overrides.task), cfg.paths.output_dir)
        sys.exit(130)


if __name__ == "__main__":
    main()
