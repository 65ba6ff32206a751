"""Glue: turn a composed config into components, run the loop, write the run's files, always close the run."""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, get_scheduler, set_seed

from loralab import console
from loralab.checkpoint import save_checkpoint
from loralab.config import accumulation_steps, validate
from loralab.data.demo import write_demo
from loralab.data.splits import build_splits
from loralab.data.text import TokenizedRecords, length_sorted_order, serialize
from loralab.export import zip_dir
from loralab.loop import EarlyStopping, fit, predict_logits
from loralab.losses import class_weights
from loralab.metrics import classification_metrics, evaluate_gates
from loralab.models.lora import apply_lora

log = logging.getLogger(__name__)

PACKAGES = ("torch", "transformers", "peft", "mlflow", "hydra-core", "scikit-learn")


def git_state(root: str | Path) -> dict[str, str]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        return {"git_commit": commit or "unknown", "git_dirty": str(bool(git("status", "--porcelain")))}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}


def write_json(path: Path, data: Any) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)
    return path


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def hydra_tags() -> dict[str, str]:
    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    return {"hydra.overrides": " ".join(hc.overrides.task) or "(none)", "hydra.job.num": str(hc.job.get("num", 0))}


def train(cfg: DictConfig) -> float:
    """Run one experiment; returns ``cfg.objective`` of the best epoch (what sweepers optimise)."""
    if cfg.get("task", "classification") != "classification":
        from loralab.regression.runner import train as train_regression  # same lifecycle, its own stages
        return train_regression(cfg)
    validate(cfg)  # before any data or model is loaded
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tracker = instantiate(cfg.tracking)
    tags = {**hydra_tags(), **git_state(cfg.paths.root_dir), "host": platform.node()}
    tracker.start(OmegaConf.to_container(cfg, resolve=True), tags=tags)
    status = "FAILED"
    try:
        summary = _train(cfg, out_dir, tracker)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.end(status)
    console.print_summary(summary)
    return summary["objective"]


def _train(cfg: DictConfig, out_dir: Path, tracker) -> dict[str, Any]:
    t_start = time.time()
    set_seed(cfg.seed)
    if cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    labels = list(cfg.data.labels)
    splits, weights = prepare_data(cfg, labels, out_dir, tracker)
    device = resolve_device(cfg.hardware.device)
    model, tokenizer, source = build_model(cfg, labels, splits, device)
    loss_fn = instantiate(cfg.loss, class_weights=weights).to(device)
    train_loader, val_loader, accum = make_loaders(cfg, splits, labels, tokenizer, source.max_length)
    result = train_model(cfg, model, tokenizer, loss_fn, train_loader, val_loader, accum, labels, device,
                         source, out_dir, tracker)
    metrics = best_epoch_report(cfg, model, val_loader, labels, device, result, out_dir, tracker)
    summary = {
        "objective_key": cfg.objective, "objective": result.history[result.best_epoch - 1][cfg.objective],
        "best_epoch": result.best_epoch, "stop_reason": result.stop_reason, "epochs_run": len(result.history),
        "history": result.history, "wall_time_s": time.time() - t_start, "fit_time_s": result.wall_time_s,
        "train_samples_per_s": result.train_samples_per_s, "accumulation_steps": accum, "device": str(device),
        "packages": {p: version(p) for p in PACKAGES},
    }
    write_json(out_dir / "training_summary.json", summary)
    artifacts = export(cfg, out_dir, tracker)
    return {**summary, "metrics": metrics, "run_dir": str(out_dir), "run_id": tracker.run_id,
            "tracking_uri": tracker.uri, "artifacts": [str(p) for p in artifacts]}


def prepare_data(cfg: DictConfig, labels: list[str], out_dir: Path, tracker):
    """Validate, split and balance; write data_report.json; return splits and the loss's class weights."""
    d = cfg.data
    if d.demo and not (Path(d.train_file).is_file() and Path(d.val_file).is_file()):
        write_demo(Path(d.train_file).parent)
    splits = build_splits(d.train_file, d.val_file, labels, val_split=d.val_split, seed=cfg.seed,
                          oversample_below=d.oversample_below, leakage=d.leakage, allow_null=d.allow_null)
    counts = splits.report["class_counts"]
    # Weights come from the counts the loss actually sees (after oversampling), so the two never double-count.
    weights = class_weights(list(counts["train_after_oversampling"].values()), cfg.loss.class_weights)
    splits.report["class_weights"] = {"values": dict(zip(labels, weights)) if weights else None,
                                      "mode": cfg.loss.class_weights,
                                      "computed_from": "train_after_oversampling"}
    log.info("class counts: %s", counts)
    log.info("class weights (%s, from train counts after oversampling): %s", cfg.loss.class_weights, weights)
    write_json(out_dir / "data_report.json", splits.report)
    tracker.log_metrics({f"class_count.{split}.{label}": n for split, c in counts.items() for label, n in c.items()})
    return splits, weights


def build_model(cfg: DictConfig, labels: list[str], splits, device: torch.device):
    source = instantiate(cfg.model)
    tokenizer = source.load_tokenizer([serialize(r.features, cfg.data.template) for r in splits.train])
    model = source.load_model(labels, tokenizer, attn_implementation=cfg.hardware.attn_implementation)
    model = apply_lora(model, instantiate(cfg.lora) if cfg.lora is not None else None).to(device)
    return model, tokenizer, source


def make_loaders(cfg: DictConfig, splits, labels: list[str], tokenizer, max_length: int):
    label2id = {label: i for i, label in enumerate(labels)}
    hw, template = cfg.hardware, cfg.data.template
    train_ds = TokenizedRecords(splits.train, tokenizer, label2id, template, max_length)
    val_ds = TokenizedRecords(splits.val, tokenizer, label2id, template, max_length)
    if train_ds.truncated or val_ds.truncated:
        log.warning("%d train / %d val texts truncated at model.max_length=%d", train_ds.truncated,
                    val_ds.truncated, max_length)
    accum = accumulation_steps(cfg.optim.batch_size, hw.micro_batch_size)
    collate = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)
    loader_args = dict(collate_fn=collate, num_workers=hw.num_workers, pin_memory=hw.pin_memory)
    train_loader = DataLoader(train_ds, batch_size=cfg.optim.batch_size // accum, shuffle=True,
                              generator=torch.Generator().manual_seed(cfg.seed), **loader_args)
    val_loader = DataLoader(val_ds, batch_size=cfg.trainer.eval_batch_size, sampler=length_sorted_order(val_ds),
                            **loader_args)
    return train_loader, val_loader, accum


def train_model(cfg, model, tokenizer, loss_fn, train_loader, val_loader, accum, labels, device, source,
                out_dir: Path, tracker):
    optimizer = instantiate(cfg.optim.optimizer)(params=[p for p in model.parameters() if p.requires_grad])
    total_steps = cfg.trainer.max_epochs * -(-len(train_loader) // accum)
    scheduler = get_scheduler(cfg.optim.scheduler, optimizer, num_training_steps=total_steps,
                              num_warmup_steps=int(cfg.optim.warmup_ratio * total_steps))
    monitor = cfg.trainer.monitor

    def on_epoch_end(epoch: int, metrics: dict[str, float], improved: bool) -> None:
        tracker.log_metrics(metrics, step=epoch)
        if improved:
            save_checkpoint(out_dir / "checkpoint_best", model, tokenizer,
                            {"epoch": epoch, "labels": labels, "template": cfg.data.template,
                             "max_length": source.max_length, monitor: metrics[monitor]})

    result = fit(model, loss_fn, optimizer, scheduler, train_loader, val_loader,
                 metric_fn=lambda y, logits: classification_metrics(y, logits.argmax(-1), labels)["scalars"],
                 max_epochs=cfg.trainer.max_epochs, monitor=monitor,
                 early_stopping=EarlyStopping(cfg.trainer.early_stopping.patience,
                                              cfg.trainer.early_stopping.min_delta, cfg.trainer.monitor_mode),
                 device=device, precision=cfg.hardware.precision, accum_steps=accum,
                 max_grad_norm=cfg.optim.max_grad_norm, on_epoch_end=on_epoch_end)
    model.load_state_dict(result.best_state, strict=False)  # the rest of the run uses the best epoch
    return result


def best_epoch_report(cfg, model, val_loader, labels, device, result, out_dir: Path, tracker) -> dict[str, Any]:
    """Full metrics of the best epoch (per-class table, confusion matrix, gates) into metrics.json and MLflow."""
    logits, y = predict_logits(model, val_loader, device, cfg.hardware.precision)
    report = classification_metrics(y, logits.argmax(-1), labels)
    gates = evaluate_gates(report["scalars"], cfg.trainer.gates)
    metrics = {"best_epoch": result.best_epoch, **report["scalars"],
               "val_loss": result.history[result.best_epoch - 1]["val_loss"],
               "per_class": report["per_class"], "confusion_matrix": report["confusion_matrix"], "gates": gates}
    write_json(out_dir / "metrics.json", metrics)
    tracker.log_metrics({f"best.{k}": v for k, v in report["scalars"].items()}, step=result.best_epoch)
    tracker.set_tags({"stop_reason": result.stop_reason, "best_epoch": result.best_epoch,
                      "gates_passed": all(g["passed"] is not False for g in gates.values())})
    return metrics


def export(cfg: DictConfig, out_dir: Path, tracker) -> list[Path]:
    """Zip the best checkpoint and send the run's files to MLflow."""
    artifacts = [out_dir / n for n in ("metrics.json", "data_report.json", "training_summary.json")]
    if cfg.export.zip:
        artifacts.append(zip_dir(out_dir / "checkpoint_best", out_dir / "model_final.zip", cfg.export.max_size_mb))
    for path in artifacts:
        tracker.log_artifact(path)
    tracker.log_artifact(out_dir / "checkpoint_best")
    if (out_dir / ".hydra").is_dir():
        tracker.log_artifact(out_dir / ".hydra", "hydra")
    return artifacts
