"""Train one experiment: python train.py [group=option] [key=value ...]; add -m for a sweep."""

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("LORALAB_ROOT", str(Path(__file__).resolve().parent))

from loralab.config import ConfigError  # noqa: E402
from loralab.data.records import DataError  # noqa: E402
from loralab.run import train  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        return train(cfg)
    except (ConfigError, DataError) as err:
        logging.getLogger("loralab").error("%s: %s", type(err).__name__, err)
        sys.exit(2)


if __name__ == "__main__":
    main()
