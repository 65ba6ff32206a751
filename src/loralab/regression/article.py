"""Article scoring: a Qwen2 sequence model with a regression head (one output per dimension) over title + content.

Stages mirror classification (prepare data → build model → loaders → train → report → export), with MSE loss,
MAE/RMSE per dimension each epoch and the best checkpoint chosen by val MAE.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, get_scheduler, set_seed

from loralab.core.checkpoint import save_checkpoint, trainable_tensors
from loralab.config import accumulation_steps
from loralab.data.records import DataError, leaked_ids
from loralab.core.sampler import EpochBatchSampler
from loralab.data.text import length_sorted_order
from loralab.export import zip_dir
from loralab.core.trainer import EarlyStopping, TrainState, fit
from loralab.models.lora import apply_lora
from loralab.inference import resolve_device
from loralab.data.prepare import score_tiers, stratified_split
from loralab.data.articles import (
    Article,
    TokenizedArticles,
    article_text,
    load_articles,
)
from loralab.data.regression_demo import write_article_demo
from loralab.metrics import regression_metrics
from loralab.reporting.regression import finish_run

log = logging.getLogger(__name__)


def label_stats(articles: Sequence[Article], dims: Sequence[str]) -> dict[str, dict[str, float]]:
    y = np.asarray([a.labels for a in articles], dtype=np.float64)
    return {d: {"mean": float(y[:, i].mean()), "std": float(y[:, i].std()), "min": float(y[:, i].min()),
                "max": float(y[:, i].max())} for i, d in enumerate(dims)}


def load_splits(train_file: str, val_file: str | None, dimension_names: Sequence[str] | None, val_split: float,
                score_tiers_n: int, seed: int, leakage: str) -> tuple[list[Article], list[Article], list[str], dict]:
    """Validated train/val articles, the dimensions in force and the data report."""
    train, train_report, dims = load_articles(train_file, dimension_names)
    report: dict[str, Any] = {"dimension_names": dims, "train_file": train_report.as_dict()}
    if val_file:
        val, val_report, _ = load_articles(val_file, dims)
        report["val_file"] = val_report.as_dict()
    else:  # carve val stratified by score tier, like loralab.data.prepare
        tiers, _ = score_tiers([float(np.mean(a.labels)) for a in train], score_tiers_n)
        parts, stratified = stratified_split(tiers, {"train": 1 - val_split, "val": val_split}, seed)
        train, val = [train[i] for i in parts["train"]], [train[i] for i in parts["val"]]
        report["val_from_train"] = {"val_split": val_split, "seed": seed, "stratified_by_score_tier": stratified}
    leaks = leaked_ids(train, val)
    report["leakage"] = {"ids_in_both": len(leaks), "examples": leaks[:20], "policy": leakage}
    if leaks:
        if leakage == "error":
            raise DataError(f"{len(leaks)} ids appear in both train and val (e.g. {leaks[:3]})")
        if leakage == "drop":
            leaked = set(leaks)
            train = [a for a in train if str(a.id) not in leaked]
        log.warning("%d ids appear in both train and val (e.g. %s)%s", len(leaks), leaks[:3],
                    "; dropped from train" if leakage == "drop" else "")
    if not train or not val:
        raise DataError(f"empty split: {len(train)} train / {len(val)} val articles")
    report.update(rows={"train": len(train), "val": len(val)}, label_stats={"train": label_stats(train, dims),
                                                                          "val": label_stats(val, dims)})
    return train, val, dims, report


def build_model(cfg: DictConfig, dims: Sequence[str], train: Sequence[Article], device: torch.device):
    source = instantiate(cfg.model)
    tokenizer = source.load_tokenizer([article_text(a, cfg.data.template) for a in train])
    model = source.load_model(list(dims), tokenizer, attn_implementation=cfg.hardware.attn_implementation)
    model.config.problem_type = "regression"  # num_labels = len(dims); saved with the checkpoint's config
    model = apply_lora(model, instantiate(cfg.lora)).to(device)  # None: full fine-tuning
    return model, tokenizer, source


def make_loaders(train, val, tokenizer, template: str, max_length: int, batch_size: int,
                 micro_batch_size: int | None, eval_batch_size: int, num_workers: int, pin_memory: bool, seed: int):
    train_ds = TokenizedArticles(train, tokenizer, template, max_length)
    val_ds = TokenizedArticles(val, tokenizer, template, max_length)
    if train_ds.truncated or val_ds.truncated:
        log.warning("%d train / %d val texts truncated at model.max_length=%d", train_ds.truncated,
                    val_ds.truncated, max_length)
    accum = accumulation_steps(batch_size, micro_batch_size)
    args = dict(collate_fn=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8), num_workers=num_workers,
                pin_memory=pin_memory)
    sampler = EpochBatchSampler([len(x) for x in train_ds.input_ids], batch_size // accum, seed)
    train_loader = DataLoader(train_ds, batch_sampler=sampler, **args)
    val_loader = DataLoader(val_ds, batch_size=eval_batch_size, sampler=length_sorted_order(val_ds), **args)
    return train_loader, val_loader, accum


def run(cfg: DictConfig, out_dir: Path, tracker) -> dict[str, Any]:
    t_start = time.time()
    set_seed(cfg.seed)
    if cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    d, hw = cfg.data, cfg.hardware
    if d.demo and not all(Path(p).is_file() for p in (d.train_file, d.val_file or d.train_file)):
        write_article_demo(Path(d.train_file).parent)
    train, val, dims, data_info = load_splits(d.train_file, d.val_file, d.dimension_names, d.val_split,
                                              d.score_tiers, cfg.seed, d.leakage)
    tracker.log_metrics({"data.train_rows": len(train), "data.val_rows": len(val),
                         **{f"data.dropped.{k}": v for k, v in data_info["train_file"]["dropped_by_reason"].items()}})
    device = resolve_device(hw.device)
    model, tokenizer, source = build_model(cfg, dims, train, device)
    train_loader, val_loader, accum = make_loaders(
        train, val, tokenizer, d.template, source.max_length, cfg.optim.batch_size, hw.micro_batch_size,
        cfg.trainer.eval_batch_size, hw.num_workers, hw.pin_memory and device.type == "cuda", cfg.seed)

    optimizer = instantiate(cfg.optim.optimizer)(params=[p for p in model.parameters() if p.requires_grad])
    total_steps = cfg.trainer.max_epochs * -(-len(train_loader) // accum)
    scheduler = get_scheduler(cfg.optim.scheduler, optimizer, num_training_steps=total_steps,
                              num_warmup_steps=int(cfg.optim.warmup_ratio * total_steps))
    monitor, ckpt_dir = cfg.trainer.monitor, out_dir / "checkpoint_best"

    best: dict[str, torch.Tensor] = {}

    def on_epoch_end(state: TrainState, metrics: dict[str, float], improved: bool) -> None:
        tracker.log_metrics(metrics, step=state.epoch)
        if improved:
            best.update(trainable_tensors(model))
            save_checkpoint(ckpt_dir, model, tokenizer,
                            {"epoch": state.epoch, "task": cfg.task.name, "dimension_names": dims, "template": d.template,
                             "max_length": source.max_length, monitor: metrics[monitor]})

    scaler = torch.amp.GradScaler(device.type, enabled=hw.precision == "fp16")
    result = fit(model, instantiate(cfg.loss).to(device), optimizer, scheduler, scaler, train_loader, val_loader,
                 TrainState(),
                 metric_fn=lambda y, pred: regression_metrics(y, pred, dims),
                 max_epochs=cfg.trainer.max_epochs, monitor=monitor,
                 early_stopping=EarlyStopping(cfg.trainer.early_stopping.patience,
                                              cfg.trainer.early_stopping.min_delta, cfg.trainer.monitor_mode),
                 device=device, precision=hw.precision, accum_steps=accum, max_grad_norm=cfg.optim.max_grad_norm,
                 on_epoch_end=on_epoch_end)
    model.load_state_dict(best, strict=False)  # the rest of the run uses the best epoch
    artifacts = [ckpt_dir]
    if cfg.export.zip:
        artifacts.append(zip_dir(ckpt_dir, out_dir / "model_final.zip", cfg.export.max_size_mb))
    return finish_run(cfg, out_dir, tracker, result, dims, data_info, device, t_start, artifacts)
