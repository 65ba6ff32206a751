"""Glue: turn a composed config into components, run the loop, write the run's files, always close the run."""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import shutil
import signal
import subprocess
import threading
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, DataCollatorWithPadding, get_scheduler, set_seed

from loralab.core import distributed
from loralab.reporting import console
from loralab.tracking import sweep
from loralab.baseline import fit_baseline
from loralab.calibrate import calibrate, probabilities, reliability_diagram
from loralab.core.checkpoint import (
    load_train_state,
    load_weights,
    read_meta,
    recover,
    rotate_top_k,
    save_checkpoint,
    save_train_state,
)
from loralab.config import (
    ConfigError,
    accumulation_steps,
    enable_lora_if_asked,
    validate,
)
from loralab.data.demo import write_demo
from loralab.core.sampler import EpochBatchSampler
from loralab.data.splits import build_splits
from loralab.data.text import TokenizedRecords, length_sorted_order, serialize
from loralab.export import export_model, sha256_file, zip_dir
from loralab.core.memory import estimate_memory, preflight, resolve_auto
from loralab.core.trainer import (
    EarlyStopping,
    TrainingInterrupted,
    TrainState,
    fit,
    predict_logits,
)
from loralab.losses import class_weights
from loralab.metrics import classification_metrics, evaluate_gates
from loralab.models.build import shipped_config
from loralab.models.lora import apply_lora
from loralab.inference import resolve_device
from loralab.reporting.report import write_reports

log = logging.getLogger(__name__)

PACKAGES = ("torch", "transformers", "peft", "mlflow", "hydra-core", "scikit-learn", "safetensors", "tokenizers")


def git_state(root: str | Path) -> dict[str, str]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        return {"git_commit": commit or "unknown", "git_dirty": str(bool(git("status", "--porcelain")))}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}


def provenance(cfg: DictConfig) -> dict[str, str]:
    """Where a result came from: data hashes, code version, packages, machine, time. Logged as MLflow tags."""
    prov = {**git_state(cfg.paths.root_dir), "host": platform.node(),
            "start_time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **{f"version.{p}": version(p) for p in PACKAGES}}
    for key in ("train_file", "val_file"):
        path = cfg.data.get(key)
        if path and Path(path).is_file():
            prov[f"data.{key}.sha256"] = sha256_file(path)
    return prov


def write_json(path: Path, data: Any) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)
    return path


def hydra_tags() -> dict[str, str]:
    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    return {"hydra.overrides": " ".join(hc.overrides.task) or "(none)", "hydra.job.num": str(hc.job.get("num", 0))}


def quiet_mode(cfg: DictConfig) -> bool:
    return console.is_quiet(cfg.get("quiet", "auto"), sweep.is_multirun())


def resolve_resume(resume: str | None, out_dir: Path) -> Path | None:
    """``auto``: this run dir's ``checkpoints/last`` if there is one; a path: that checkpoint; None: fresh."""
    if not resume:
        return None
    if resume == "auto":
        last = out_dir / "checkpoints" / "last"
        recover(last)
        if last.is_dir():
            return last
        log.info("resume=auto: no checkpoint in %s, starting fresh", out_dir / "checkpoints")
        return None
    path = Path(resume)
    recover(path)
    if not path.is_dir():
        raise ConfigError(f"resume={resume!r}: checkpoint directory not found")
    return path


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT/SIGTERM ask the loop to stop after the current optimizer step (a second SIGINT aborts at once)."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop.is_set
        return

    def handler(signum, frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.warning("%s received: stopping after the current step", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop.is_set
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def check_memory(cfg: DictConfig) -> None:
    """Estimate training memory for model x hardware x batch x length; refuse a clear misfit before loading."""
    hw, m = cfg.hardware, cfg.model
    arch = shipped_config(m.arch)
    arch["vocab_size"] = arch.get("vocab_size") or m.tokenizer_vocab_size
    lora = cfg.lora if cfg.lora.enabled else None
    est = estimate_memory(arch, num_labels=len(cfg.data.labels), lora_r=lora.r if lora else None,
                          target_modules=list(lora.target_modules) if lora else [],
                          precision=hw.precision, load_in_4bit=hw.load_in_4bit,
                          micro_batch=hw.micro_batch_size or cfg.optim.batch_size, max_length=m.max_length,
                          gradient_checkpointing=hw.gradient_checkpointing, on_cuda=hw.device.startswith("cuda"))
    preflight(est, hw.memory_gib, hw.preflight, f"{m.name} (lora={'r=%d' % lora.r if lora else 'none'}) "
              f"on hardware={hw.name}")


def check_config(cfg: DictConfig) -> None:
    """Every rule and the memory preflight: one-line errors before any data or model is loaded."""
    validate(cfg)
    if cfg.model.arch:
        check_memory(cfg)


def train(cfg: DictConfig) -> float:
    """Run one experiment; returns ``cfg.objective`` of the best epoch (what sweepers optimise)."""
    if HydraConfig.initialized():
        with open_dict(cfg):
            enable_lora_if_asked(cfg, HydraConfig.get().overrides.task)
    if cfg.task.name != "classification":
        from loralab.regression.runner import (
            train as train_regression,  # same lifecycle, its own stages
        )
        return train_regression(cfg)
    with open_dict(cfg):
        cfg.hardware = resolve_auto(OmegaConf.to_container(cfg.hardware, resolve=True))
    in_sweep = sweep.is_multirun()
    quiet = quiet_mode(cfg)
    if quiet:
        console.quiet_logging()
    if not in_sweep:
        check_config(cfg)  # a single run with a bad value fails before an MLflow run exists
    ddp = distributed.init(cfg.distributed.backend, cfg.distributed.timeout_min)
    if not ddp.is_main:
        quiet = True
        console.quiet_logging()
    if not quiet:
        console.print_config(OmegaConf.to_container(cfg, resolve=True),
                             HydraConfig.get().overrides.task if HydraConfig.initialized() else ())
    out_dir = Path(ddp.broadcast(cfg.paths.output_dir))  # under torchrun every rank uses rank 0's run dir
    if ddp.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    resume_dir = resolve_resume(cfg.resume, out_dir)
    resumed_run_id = read_meta(resume_dir)["meta"].get("mlflow_run_id") if resume_dir else None
    prov = provenance(cfg)
    tracker = instantiate(cfg.tracking, enabled=cfg.tracking.enabled and ddp.is_main)  # one run, whatever N
    parent_run_id, sweep_tags = sweep.job_context(tracker) if ddp.is_main else (None, {})  # (None, {}) outside -m
    tracker.start(OmegaConf.to_container(cfg, resolve=True), tags={**hydra_tags(), **sweep_tags, **prov},
                  parent_run_id=parent_run_id, resume_run_id=resumed_run_id)
    try:
        with tracker.closing(killed=(TrainingInterrupted, KeyboardInterrupt)):
            if in_sweep:
                check_config(cfg)  # in a sweep a bad value is recorded as a FAILED child, and the sweep goes on
            with stop_on_signals() as stop_requested:
                summary = _train(cfg, out_dir, tracker, resume_dir, stop_requested, prov, ddp)
    finally:
        distributed.shutdown()
    if ddp.is_main and quiet:
        console.print_run_line(summary, HydraConfig.get().job.num if sweep.is_multirun() else None)
    elif ddp.is_main:
        console.print_summary(summary)
    return summary["objective"]


def _train(cfg: DictConfig, out_dir: Path, tracker, resume_dir: Path | None, stop_requested,
           prov: dict[str, str], ddp: distributed.Dist = distributed.Dist()) -> dict[str, Any]:
    t_start = time.time()
    set_seed(cfg.seed)
    if cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    labels = list(cfg.data.labels)
    splits, weights = prepare_data(cfg, labels, out_dir if ddp.is_main else None, tracker)
    baseline = baseline_stage(cfg, splits, labels, tracker) if ddp.is_main else None
    device = resolve_device(cfg.hardware.device)
    if ddp.enabled and device.type == "cuda":
        device = torch.device("cuda", ddp.local_rank)
    model, tokenizer, source = build_model(cfg, labels, splits, device,
                                           tokenizer_dir=resume_dir / "tokenizer" if resume_dir else None, ddp=ddp)
    loss_fn = instantiate(cfg.loss, class_weights=weights).to(device)
    train_loader, val_loader, accum = make_loaders(cfg, splits, labels, tokenizer, source.max_length, ddp)
    state = train_model(cfg, model, tokenizer, loss_fn, train_loader, val_loader, accum, labels, device,
                        out_dir, tracker, resume_dir, stop_requested, ddp)
    if not ddp.is_main:  # rank 0 reports and exports
        return {"objective": state.history[state.best_epoch - 1][cfg.objective]}
    model = model.module if isinstance(model, DistributedDataParallel) else model
    metrics = best_epoch_report(cfg, model, val_loader, labels, device, state, out_dir, tracker, baseline)
    history = state.history
    summary = {
        "objective_key": cfg.objective, "objective": history[state.best_epoch - 1][cfg.objective],
        "best_epoch": state.best_epoch, "stop_reason": state.stop_reason, "epochs_run": len(history),
        "history": history, "wall_time_s": time.time() - t_start,
        "fit_time_s": state.fit_time_s, "train_samples_per_s": state.train_samples_per_s,
        "optimizer_steps": state.step, "skipped_steps": state.skipped_steps, "accumulation_steps": accum,
        "device": str(device), "world_size": ddp.world_size,
        "resumed_from": str(resume_dir) if resume_dir else None, "provenance": prov,
    }
    write_json(out_dir / "training_summary.json", summary)
    artifacts = export(cfg, out_dir, tracker, model, tokenizer, source, val_loader, labels, metrics, prov)
    artifacts += write_reports(out_dir, labels, summary, metrics, splits.report, tracker)
    return {**summary, "metrics": metrics, "run_dir": str(out_dir), "run_id": tracker.run_id,
            "tracking_uri": tracker.uri, "artifacts": [str(p) for p in artifacts]}


def prepare_data(cfg: DictConfig, labels: list[str], out_dir: Path | None, tracker):
    """Validate, split and balance; write data_report.json (unless ``out_dir`` is None); return splits and the
    loss's class weights. Deterministic, so every DDP rank gets the same oversampled split before sharding."""
    d = cfg.data
    if d.demo and not (Path(d.train_file).is_file() and Path(d.val_file).is_file()):
        write_demo(Path(d.train_file).parent)  # atomic per file, so concurrent writers agree
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
    if out_dir is not None:
        write_json(out_dir / "data_report.json", splits.report)
    tracker.log_metrics({f"class_count.{split}.{label}": n for split, c in counts.items() for label, n in c.items()})
    return splits, weights


def baseline_stage(cfg: DictConfig, splits, labels: list[str], tracker) -> dict[str, Any] | None:
    """The scikit-learn baseline on the train rows before oversampling, scored on the same val split."""
    if cfg.get("baseline") is None:
        return None
    b = cfg.baseline
    result = fit_baseline(b.name, splits.train_original, splits.val, labels, cfg.seed,
                          OmegaConf.to_container(b.params, resolve=True), b.get("threads"))
    if result:
        tracker.log_metrics({f"baseline_{k}": v for k, v in result["scalars"].items()})
    return result


def build_model(cfg: DictConfig, labels: list[str], splits, device: torch.device, tokenizer_dir: Path | None = None,
                ddp: distributed.Dist = distributed.Dist()):
    """Model (LoRA-wrapped unless lora=none) on ``device``; a resumed run reuses its checkpoint's tokenizer.
    Under DDP the model is wrapped in ``DistributedDataParallel`` (gradients of trainable weights only)."""
    source = instantiate(cfg.model)
    if tokenizer_dir is not None:
        tokenizer = source.configure(AutoTokenizer.from_pretrained(tokenizer_dir))
    else:
        tokenizer = source.load_tokenizer([serialize(r.features, cfg.data.template) for r in splits.train])
        if ddp.enabled and not source.pretrained:  # a trained tokenizer must be rank 0's on every rank
            tokenizer = source.tokenizer_from_json(ddp.broadcast(tokenizer.backend_tokenizer.to_str()))
    hw = cfg.hardware
    # LoRA trains fp32 adapters on a frozen base, so the base can sit in 16 bits; full fine-tuning keeps fp32
    # master weights and gets its speed from autocast.
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(hw.precision)
    dtype = half if cfg.lora.enabled and half is not None and device.type == "cuda" else torch.float32
    model = source.load_model(labels, tokenizer, attn_implementation=hw.attn_implementation, dtype=dtype,
                              load_in_4bit=hw.load_in_4bit, compute_dtype=half)
    if hw.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_lora(model, instantiate(cfg.lora))  # None (full fine-tuning) when lora.enabled is false
    if not hw.load_in_4bit:  # bitsandbytes places quantized weights itself
        model = model.to(device)
    if cfg.trainer.compile:
        model.compile()  # in place: parameter names (and so checkpoints) stay the same
    if ddp.enabled:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, tokenizer, source


def make_loaders(cfg: DictConfig, splits, labels: list[str], tokenizer, max_length: int,
                 ddp: distributed.Dist = distributed.Dist()):
    """Train batches (this rank's shard under DDP) and the whole validation set, longest first."""
    label2id = {label: i for i, label in enumerate(labels)}
    hw, template = cfg.hardware, cfg.data.template
    cache = cfg.data.cache_dir
    train_ds = TokenizedRecords(splits.train, tokenizer, label2id, template, max_length, cache)
    val_ds = TokenizedRecords(splits.val, tokenizer, label2id, template, max_length, cache)
    if train_ds.truncated or val_ds.truncated:
        log.warning("%d train / %d val texts truncated at model.max_length=%d", train_ds.truncated,
                    val_ds.truncated, max_length)
    if cfg.optim.batch_size % ddp.world_size:
        raise ConfigError(f"optim.batch_size={cfg.optim.batch_size}: the global batch must be divisible by the "
                          f"{ddp.world_size} processes")
    per_rank = cfg.optim.batch_size // ddp.world_size
    accum = accumulation_steps(per_rank, hw.micro_batch_size)
    collate = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)
    loader_args = dict(collate_fn=collate, num_workers=hw.num_workers, pin_memory=hw.pin_memory)
    sampler = EpochBatchSampler(train_ds.lengths, per_rank // accum, cfg.seed,
                                group_by_length=cfg.trainer.group_by_length, rank=ddp.rank,
                                world_size=ddp.world_size)
    train_loader = DataLoader(train_ds, batch_sampler=sampler, **loader_args)
    val_loader = DataLoader(val_ds, batch_size=cfg.trainer.eval_batch_size, sampler=length_sorted_order(val_ds),
                            **loader_args)
    return train_loader, val_loader, accum


def shard(loader: DataLoader, ddp: distributed.Dist) -> DataLoader:
    """This rank's slice of an (ordered) evaluation loader; the slices are gathered again after prediction."""
    if not ddp.enabled:
        return loader
    indices = list(loader.sampler)[ddp.rank::ddp.world_size]
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=indices, collate_fn=loader.collate_fn,
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory)


def adopt_checkpoints(source: Path, ckpt_dir: Path, ranked: list[dict[str, Any]], ddp) -> list[dict[str, Any]]:
    """Resuming from another run's checkpoint: copy that run's ranked epochs here, so the best epoch can still be
    reloaded at the end; entries whose directories are gone drop out of the ranking."""
    if source.resolve() != ckpt_dir.resolve() and ddp.is_main:
        for entry in ranked:
            if (source / entry["name"]).is_dir() and not (ckpt_dir / entry["name"]).exists():
                shutil.copytree(source / entry["name"], ckpt_dir / entry["name"])
    ddp.barrier()
    kept = [e for e in ranked if (ckpt_dir / e["name"]).is_dir()]
    if len(kept) < len(ranked):
        log.warning("resume: %d ranked checkpoint(s) of %s not found; the best epoch is chosen among the rest",
                    len(ranked) - len(kept), source)
    return kept


def train_model(cfg, model, tokenizer, loss_fn, train_loader, val_loader, accum, labels, device,
                out_dir: Path, tracker, resume_dir: Path | None, stop_requested,
                ddp: distributed.Dist = distributed.Dist()) -> TrainState:
    """Optimizer, schedule and checkpoints around ``loop.fit``; leaves the best epoch's weights in ``model``.
    Only rank 0 writes checkpoints; every rank can resume from them."""
    core = model.module if isinstance(model, DistributedDataParallel) else model
    optimizer = instantiate(cfg.optim.optimizer)(params=[p for p in model.parameters() if p.requires_grad])
    total_steps = cfg.trainer.max_epochs * -(-len(train_loader) // accum)
    scheduler = get_scheduler(cfg.optim.scheduler, optimizer, num_training_steps=total_steps,
                              num_warmup_steps=int(cfg.optim.warmup_ratio * total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.hardware.precision == "fp16")
    monitor, mode = cfg.trainer.monitor, cfg.trainer.monitor_mode
    ckpt_dir = out_dir / "checkpoints"
    state, ranked = TrainState(), []
    if resume_dir is not None:
        saved = load_train_state(resume_dir, model=core, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        state, ranked = TrainState(**saved["loop"]), saved["meta"]["top_k"]
        ranked = adopt_checkpoints(resume_dir.parent, ckpt_dir, ranked, ddp)
        log.info("resumed from %s at epoch %d, step %d", resume_dir, state.epoch, state.step)
        tracker.set_tags({"resumed_from": str(resume_dir)})
    parts = dict(model=core, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler, scaler=scaler)

    def save(name: str, st: TrainState) -> None:
        if not ddp.is_main:
            return
        save_train_state(ckpt_dir / name, **parts, loop_state=st.as_dict(),
                         meta={"mlflow_run_id": tracker.run_id, "top_k": ranked, "monitor": monitor})

    def on_epoch_end(st: TrainState, metrics: dict[str, float], improved: bool) -> None:
        nonlocal ranked
        tracker.log_metrics(metrics, step=st.epoch)
        # No "=" in the name: the path must work as a Hydra override value (resume=.../epoch_003).
        entry = {"name": f"epoch_{st.epoch:03d}", "epoch": st.epoch, "value": metrics[monitor]}
        ranked = sorted([*ranked, entry], key=lambda e: e["value"], reverse=mode == "max")
        if entry in ranked[:cfg.trainer.save_top_k]:
            save(entry["name"], st)
        save("last", st)  # always; written after the top-k entry so `last` never points at a missing one
        if not ddp.is_main:
            ranked = ranked[:cfg.trainer.save_top_k]
            return
        ranked = rotate_top_k(ckpt_dir, ranked, cfg.trainer.save_top_k)
        if improved:
            save_checkpoint(out_dir / "checkpoint_best", core, tokenizer,
                            {"epoch": st.epoch, "labels": labels, "template": cfg.data.template,
                             "max_length": cfg.model.max_length, monitor: metrics[monitor]})

    state = fit(model, loss_fn, optimizer, scheduler, scaler, train_loader, shard(val_loader, ddp), state,
                metric_fn=lambda y, logits: classification_metrics(y, logits.argmax(-1), labels)["scalars"],
                max_epochs=cfg.trainer.max_epochs, monitor=monitor,
                early_stopping=EarlyStopping(cfg.trainer.early_stopping.patience,
                                             cfg.trainer.early_stopping.min_delta, mode),
                device=device, precision=cfg.hardware.precision, accum_steps=accum,
                max_grad_norm=cfg.optim.max_grad_norm, on_epoch_end=on_epoch_end,
                on_interrupt=lambda st: save("last", st), stop_requested=stop_requested, ddp=ddp,
                progress=not quiet_mode(cfg))
    ddp.barrier()  # rank 0's checkpoints are complete
    if ddp.is_main and ranked:
        load_weights(ckpt_dir / ranked[0]["name"], core)  # the rest of the run uses the best epoch
    elif ddp.is_main:
        log.warning("no ranked checkpoint to reload (resumed after the last epoch?); using the current weights")
    return state


def best_epoch_report(cfg, model, val_loader, labels, device, state: TrainState, out_dir: Path,
                      tracker, baseline: dict[str, Any] | None = None) -> dict[str, Any]:
    """Full metrics of the best epoch (per-class table, confusion matrix, gates, calibration, baseline) into
    metrics.json and MLflow."""
    logits, y = predict_logits(model, val_loader, device, cfg.hardware.precision)
    report = classification_metrics(y, logits.argmax(-1), labels)
    gates = evaluate_gates(report["scalars"], cfg.trainer.gates or {})
    c = cfg.calibration
    calib = calibrate(logits, y, c.method, c.n_bins, list(c.t_bounds))
    curves = {"uncalibrated": probabilities(logits)}
    if c.method != "none":
        curves[f"T = {calib['temperature']:.3f}"] = probabilities(logits, calib["temperature"])
    plot = reliability_diagram(y, curves, out_dir / "plots" / "reliability_diagram.png", c.n_bins,
                               title=f"Reliability diagram: validation, best epoch {state.best_epoch}")
    metrics = {"best_epoch": state.best_epoch, **report["scalars"],
               "val_loss": state.history[state.best_epoch - 1]["val_loss"], **calib.pop("scalars"),
               "per_class": report["per_class"], "confusion_matrix": report["confusion_matrix"], "gates": gates,
               "calibration": {**calib, "fit_on": "val", "plot": str(plot)}, "baseline": baseline}
    write_json(out_dir / "metrics.json", metrics)
    best = state.history[state.best_epoch - 1]  # every metric of the best epoch (val_loss too) as best.*
    tracker.log_metrics({f"best.{k}": v for k, v in {**best, **report["scalars"]}.items()}, step=state.best_epoch)
    tracker.log_metrics({f"best.{k}": v for k, v in metrics.items() if k.startswith(("val_nll", "val_ece",
                         "val_brier", "temperature"))}, step=state.best_epoch)
    tracker.log_artifact(plot, "plots")
    tracker.set_tags({"stop_reason": state.stop_reason, "best_epoch": state.best_epoch,
                      "gates_passed": all(g["passed"] is not False for g in gates.values())})
    return metrics


def zip_parts(out_dir: Path, parts, max_mb: float) -> list[str]:
    """``auto``: merged + adapter (+ base) when they fit the size gate, else the adapter alone — a real model's
    merged weights (GBs) stay in the run dir instead of failing a finished run at the last step."""
    if parts != "auto":
        return [p for p in parts if (out_dir / p).exists()]
    present = [p for p in ("merged", "adapter", "base", "loralab.json") if (out_dir / p).exists()]
    size_mb = sum(f.stat().st_size for p in present for f in (out_dir / p).rglob("*") if f.is_file()) / 2**20
    if size_mb <= max_mb or "adapter" not in present:
        return present
    log.warning("export: merged/ + adapter/ are %.0f MB > export.max_size_mb=%g; model_final.zip holds the adapter "
                "(merged/ stays in the run dir)", size_mb, max_mb)
    return ["adapter", "loralab.json"]


def export(cfg: DictConfig, out_dir: Path, tracker, model, tokenizer, source, val_loader, labels,
           metrics: dict[str, Any], prov: dict[str, str]) -> list[Path]:
    """Export the best model (merged, adapter, loralab.json; verified by reloading), zip it, send files to MLflow."""
    e = cfg.export
    batch = next(iter(val_loader))  # rows spread over the first (longest-first) batch: mixed padding
    data_files = {k: cfg.data[k] for k in ("train_file", "val_file") if cfg.data[k]}
    meta = {"labels": labels, "temperature": metrics["temperature"], "calibration": metrics["calibration"],
            "serialization": {"template": cfg.data.template, "json_sort_keys": True, "json_ensure_ascii": True,
                              "max_length": source.max_length, "truncation_side": source.truncation_side},
            "max_length": source.max_length, "allow_null": cfg.data.allow_null,
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
            "gates": OmegaConf.to_container(cfg.trainer.gates) if cfg.trainer.gates else {},
            "data": {k: {"path": str(p), "sha256": prov.get(f"data.{k}.sha256") or sha256_file(p)}
                     for k, p in data_files.items()},
            "model": {"name": source.name, "hub_id": source.hub_id, "path": source.path,
                      "pretrained": source.pretrained,
                      "lora": OmegaConf.to_container(cfg.lora, resolve=True) if cfg.lora.enabled else None},
            "packages": {p: version(p) for p in PACKAGES}, **git_state(cfg.paths.root_dir)}
    rows = torch.linspace(0, len(batch["input_ids"]) - 1, min(e.verify_rows, len(batch["input_ids"]))).long()
    # Export (and its reload check, specified in fp32) from an fp32 copy: a LoRA run on CUDA keeps its base in
    # 16 bits and its adapters/head in fp32, which only mix under autocast.
    model = model.to("cpu", torch.float32)
    export_model(model, tokenizer, out_dir, {k: v[rows] for k, v in batch.items()}, meta=meta,
                 base_location=source.location, save_base=not source.pretrained, atol=e.verify_atol,
                 trust_remote_code=source.trust_remote_code)
    artifacts = [out_dir / n for n in ("metrics.json", "data_report.json", "training_summary.json", "loralab.json")]
    if e.zip:
        artifacts.append(zip_dir(out_dir, out_dir / "model_final.zip", e.max_size_mb,
                                 include=zip_parts(out_dir, e.zip_parts, e.max_size_mb)))
    for path in [*artifacts, out_dir / "checkpoint_best"]:
        tracker.log_artifact(path)
    if (out_dir / ".hydra").is_dir():
        tracker.log_artifact(out_dir / ".hydra", "hydra")
    return artifacts
