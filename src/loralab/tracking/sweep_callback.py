"""The Hydra callback (``hydra.callbacks`` in conf/hydra/default.yaml) that makes a sweep one MLflow parent run:
opened before the first job, given the sweep summary after the last (``loralab.tracking.sweep``).

Hydra builds it for every run, also one a config error ends at once, so it imports the sweep machinery (MLflow
and the reporting stack, ~3 s of CPU) only when a multirun starts or ends.
"""

from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class SweepTracking(Callback):
    """Parent run before the sweep, summary after. ``on_multirun_end`` runs in the launching process once every
    job has returned, whatever the launcher."""

    def __init__(self, summary_name: str = "sweep_summary") -> None:
        self.summary_name = summary_name

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from loralab.tracking import sweep

        tracking = sweep.tracking_of(config)
        if tracking is not None:
            sweep.open_sweep(config, tracking)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from loralab.tracking import sweep

        tracking = sweep.tracking_of(config)
        if tracking is not None:
            sweep.close_sweep(config, tracking, self.summary_name)
