"""MarketSentinel, the frozen loop: HDF5 features in file (time) order ▸ MLP ▸ MSE(head 0) + MSE(head 1) ▸ AdamW;
validation every epoch without gradients, early stopping on val loss, the best model in
``checkpoints/model_best.pt`` (weights and sizes only). Resume, signals and top-k come from the lifecycle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from loralab.config.tasks import TabularRegressionConf
from loralab.core.loaders import TaskData
from loralab.data.hdf5 import H5Regression, read_schema
from loralab.data.regression_demo import write_tabular_demo
from loralab.metrics import MetricNames, regression_metric_names, regression_metrics
from loralab.models.mlp import save_best
from loralab.reporting.provenance import code_version
from loralab.reporting.regression import write_regression_report
from loralab.result import RunResult
from loralab.tasks.base import Finalized, Task

CHECKPOINT = Path("checkpoints") / "model_best.pt"


class TabularRegression(Task):
    name = "tabular_regression"
    schema = TabularRegressionConf
    conf: TabularRegressionConf

    @classmethod
    def metric_names(cls, cfg: DictConfig) -> MetricNames:
        return regression_metric_names(list(cfg.data.target_names))

    def build_data(self) -> TaskData:
        d = self.conf.data
        self.output_names = list(d.target_names)
        if d.demo and not all(Path(p).is_file() for p in (d.train_file, d.val_file, d.schema_file)):
            write_tabular_demo(d.train_file, d.val_file, d.schema_file)
        self.input_dim = len(read_schema(d.schema_file))  # the schema, never the file, says how many features
        train, val = (H5Regression(f, self.input_dim, len(self.output_names)) for f in (d.train_file, d.val_file))
        self.val = val
        self.data_info = {
            "train_file": d.train_file,
            "val_file": d.val_file,
            "schema_file": d.schema_file,
            "input_dim": self.input_dim,
            "train_rows": len(train),
            "val_rows": len(val),
        }
        self.ctx.tracker.log_metrics({f"data.{k}": self.data_info[k] for k in ("input_dim", "train_rows", "val_rows")})
        # shuffle=False: later rows never leak into earlier batches' statistics.
        return TaskData(train, val, shuffle=False)

    def build_model(self) -> nn.Module:
        return instantiate(self.conf.model, input_dim=self.input_dim, output_dim=len(self.output_names)).to(
            self.ctx.device
        )

    def loss(self) -> nn.Module:
        return instantiate(self.conf.loss).to(self.ctx.device)

    def metrics(self, y: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
        return regression_metrics(y, outputs, self.output_names)

    def finalize(self, model: nn.Module, val_loader: DataLoader, result: RunResult) -> Finalized:
        """``checkpoints/model_best.pt``, the regression report and the MLflow model (checkpoint + schema)."""
        from loralab.tracking.pyfunc import log_tabular_regressor  # mlflow.pyfunc and pandas: only runs that finish

        ckpt = save_best(self.ctx.out_dir / CHECKPOINT, model, result.best_epoch, result.best["val_loss"])
        out = write_regression_report(
            self.conf, self.ctx.out_dir, self.ctx.tracker, result, self.output_names, self.data_info
        )
        model_uri = log_tabular_regressor(
            self.ctx.tracker,
            ckpt,
            Path(self.conf.data.schema_file),
            self.ctx.out_dir / "training_metadata.json",
            self.val.features.numpy(),
            code_version(result.provenance)["packages"],
        )
        return Finalized(out["metrics"], [*out["artifacts"], ckpt], model_uri)
