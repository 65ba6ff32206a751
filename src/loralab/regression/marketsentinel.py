"""MarketSentinel, the frozen loop: DataLoader → Model → Loss → Optimizer → Checkpoint.

HDF5 features in file (time) order, an MLP, MSE(head 0) + MSE(head 1), AdamW; validation every epoch without
gradients, early stopping on val loss, and only the best model kept (``checkpoints/model_best.pt``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from transformers import get_scheduler, set_seed

from loralab.core.checkpoint import trainable_tensors
from loralab.core.sampler import EpochBatchSampler
from loralab.core.trainer import EarlyStopping, TrainState, fit
from loralab.inference import resolve_device
from loralab.data.regression_demo import write_tabular_demo
from loralab.data.hdf5 import H5Regression, read_schema
from loralab.metrics import regression_metrics
from loralab.models.mlp import save_best
from loralab.reporting.regression import finish_run

log = logging.getLogger(__name__)

CHECKPOINT = Path("checkpoints") / "model_best.pt"


def make_loaders(train_file: str, val_file: str, schema_file: str, n_targets: int, batch_size: int,
                 eval_batch_size: int, num_workers: int, device: torch.device):
    """Loaders in file order (``shuffle=False``: later rows never leak into earlier batches' statistics)."""
    input_dim = len(read_schema(schema_file))  # the schema, never the file, says how many features there are
    train_ds, val_ds = H5Regression(train_file, input_dim, n_targets), H5Regression(val_file, input_dim, n_targets)
    args = dict(num_workers=num_workers, pin_memory=device.type == "cuda")
    in_order = EpochBatchSampler([1] * len(train_ds), batch_size, seed=0, shuffle=False, group_by_length=False)
    return (DataLoader(train_ds, batch_sampler=in_order, **args),
            DataLoader(val_ds, batch_size=eval_batch_size, shuffle=False, **args))


def run(cfg: DictConfig, out_dir: Path, tracker) -> dict[str, Any]:
    t_start = time.time()
    set_seed(cfg.seed)
    if cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    d, names = cfg.data, list(cfg.data.target_names)
    if d.demo and not all(Path(p).is_file() for p in (d.train_file, d.val_file, d.schema_file)):
        write_tabular_demo(d.train_file, d.val_file, d.schema_file)
    device = resolve_device(cfg.hardware.device)
    train_loader, val_loader = make_loaders(d.train_file, d.val_file, d.schema_file, len(names), cfg.optim.batch_size,
                                            cfg.trainer.eval_batch_size, cfg.hardware.num_workers, device)
    input_dim = train_loader.dataset.features.shape[1]
    data_info = {"train_file": d.train_file, "val_file": d.val_file, "schema_file": d.schema_file,
                 "input_dim": input_dim, "train_rows": len(train_loader.dataset), "val_rows": len(val_loader.dataset)}
    tracker.log_metrics({"data.input_dim": input_dim, "data.train_rows": data_info["train_rows"],
                         "data.val_rows": data_info["val_rows"]})

    model = instantiate(cfg.model, input_dim=input_dim, output_dim=len(names)).to(device)
    loss_fn = instantiate(cfg.loss).to(device)
    optimizer = instantiate(cfg.optim.optimizer)(params=model.parameters())
    total_steps = cfg.trainer.max_epochs * len(train_loader)
    scheduler = get_scheduler(cfg.optim.scheduler, optimizer, num_training_steps=total_steps,
                              num_warmup_steps=int(cfg.optim.warmup_ratio * total_steps))
    ckpt_path = out_dir / CHECKPOINT

    best: dict[str, torch.Tensor] = {}

    def on_epoch_end(state: TrainState, metrics: dict[str, float], improved: bool) -> None:
        tracker.log_metrics(metrics, step=state.epoch)
        if improved:
            save_best(ckpt_path, model, state.epoch, metrics["val_loss"])
            best.update(trainable_tensors(model))

    scaler = torch.amp.GradScaler(device.type, enabled=cfg.hardware.precision == "fp16")
    result = fit(model, loss_fn, optimizer, scheduler, scaler, train_loader, val_loader, TrainState(),
                 metric_fn=lambda y, pred: regression_metrics(y, pred, names),
                 max_epochs=cfg.trainer.max_epochs, monitor=cfg.trainer.monitor,
                 early_stopping=EarlyStopping(cfg.trainer.early_stopping.patience,
                                              cfg.trainer.early_stopping.min_delta, cfg.trainer.monitor_mode),
                 device=device, precision=cfg.hardware.precision, accum_steps=1,
                 max_grad_norm=cfg.optim.max_grad_norm, on_epoch_end=on_epoch_end)
    model.load_state_dict(best)
    return finish_run(cfg, out_dir, tracker, result, names, data_info, device, t_start, [ckpt_path.parent])
