"""One run of any task: check ▸ preflight ▸ tracker ▸ data ▸ model ▸ train ▸ finalize, always closing the run.

The MLflow run ends FINISHED, FAILED (with the error as tags) or KILLED (SIGINT/SIGTERM, after writing ``last``),
whatever the task. Tasks (``conf/task``) only say what differs; resume, signals, top-k checkpoints, DDP, sweep
parent/child runs, provenance and the memory preflight are all here, so every task has them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from filelock import FileLock, Timeout
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from transformers import set_seed

from loralab import config
from loralab.core import distributed
from loralab.config.changes import describe
from loralab.core.checkpoint import Checkpoints, verify_resumable
from loralab.core.device import resolve_device
from loralab.core.loaders import make_loaders, shard
from loralab.core.trainer import Fit, Trainer
from loralab.errors import ConfigError, TrainingInterrupted
from loralab.fs import atomic_write_json, writable_dir
from loralab.models.memory import check_memory
from loralab.pretrain import PretrainStage
from loralab.reporting import console
from loralab.reporting.provenance import provenance
from loralab.resume import CONFIG_FILE, checkpoint_run_id, resolve_resume, resume_changes
from loralab.tasks.base import RunContext, Task
from loralab.tracking import sweep

log = logging.getLogger(__name__)

RUN_LOCK = ".run.lock"  # held by the run using a run dir


def settle(cfg: DictConfig) -> DictConfig:
    """The config the run will use: typed and checked, ``auto`` resolved (and logged), memory preflight passed.
    Raises ``ConfigError`` (one line) before anything loads."""
    cfg = config.check(cfg)
    cfg, resolved = config.resolve_hardware(cfg)
    if resolved:
        log.info("hardware auto values resolved: %s", ", ".join(f"{k}={v}" for k, v in resolved.items()))
    if "pretrained" in cfg.model:  # a transformer (ModelSource), not the MLP
        check_memory(cfg.model, cfg.lora, cfg.hardware, num_labels=len(output_names(cfg)),
                     batch_size=cfg.optim.batch_size)
    return cfg


def settle_job(cfg: DictConfig, tracker) -> DictConfig:
    """``settle`` inside a sweep job's MLflow run; a job that fails it still shows the values it was given."""
    try:
        return settle(cfg)
    except ConfigError:
        with contextlib.suppress(Exception):  # a value that does not even resolve is already named in the error
            tracker.log_params(OmegaConf.to_container(cfg, resolve=True))
        raise


def output_names(cfg: DictConfig) -> list[str]:
    """Labels (classification) or target dimensions (regression); [] when the data decides."""
    d = cfg.data
    return list(d.get("labels") or d.get("dimension_names") or d.get("target_names") or [])


@contextlib.contextmanager
def stop_on_signals() -> Iterator[Callable[[], bool]]:
    """SIGINT/SIGTERM ask the trainer to stop after the current optimizer step (a second SIGINT aborts at once)."""
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


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Intra-op threads for this run only (``hardware.torch_threads``; null keeps torch's default). Small models
    gain nothing from more threads and, on a busy CPU, their synchronisation costs more than the maths: measured
    0.75 vs 32 ms per MLP step and 0.14-0.22 vs 0.8-1.8 s per tiny-Qwen2 step, 1 vs 2 threads on a loaded host."""
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def rank_device(name: str, ddp) -> torch.device:
    """The run's device; under torchrun on CUDA, this rank's GPU."""
    device = resolve_device(name)
    return torch.device("cuda", ddp.local_rank) if ddp.enabled and device.type == "cuda" else device


def hydra_tags() -> dict[str, str]:
    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    return {"hydra.overrides": " ".join(hc.overrides.task) or "(none)", "hydra.job.num": str(hc.job.get("num", 0))}


def dataset_inputs(data_files: dict[str, Any], prov: dict[str, str]) -> dict[str, tuple[str, str]]:
    """``{"train"|"val"|"test": (path, sha256)}`` for the data files that exist (provenance hashed them)."""
    return {key.removesuffix("_file"): (path, prov[f"data.{key}.sha256"]) for key, path in data_files.items()
            if f"data.{key}.sha256" in prov}


def resolve_length(trainer: DictConfig, steps_per_epoch: int) -> tuple[DictConfig, dict[str, int]]:
    """``trainer.max_epochs=auto``: as many epochs as ``trainer.min_steps`` optimizer steps need, and a patience
    (in epochs) covering at least ``early_stopping.patience_steps`` steps. So a 100-row set gets as many updates
    as a large one, and early stopping waits as many steps on it. Returns the trainer group with plain numbers in
    place and what was resolved (empty when ``max_epochs`` was a number: it is used as given)."""
    if trainer.max_epochs != "auto":
        return trainer, {}
    es = trainer.early_stopping
    epochs = max(1, math.ceil(trainer.min_steps / steps_per_epoch))
    between_evals = trainer.get("val_check_interval") or steps_per_epoch  # patience counts evaluations
    patience = max(es.patience, math.ceil(es.get("patience_steps", 0) / min(between_evals, steps_per_epoch)))
    resolved = OmegaConf.merge(trainer, {"max_epochs": epochs, "early_stopping": {"patience": patience}})
    return resolved, {"max_epochs": epochs, "patience": patience, "steps_per_epoch": steps_per_epoch}


def epoch_curves(metrics: dict[str, Any]) -> dict[str, Any]:
    """An epoch's metrics as MLflow curves at step = epoch: the optimizer step count is not a curve of its own."""
    return {k: v for k, v in metrics.items() if k != "step"}


def step_logger(tracker) -> Callable[[int, dict[str, float]], None]:
    """The trainer's ``on_step``: ``step.<name>`` curves at step = optimizer step. Train numbers are queued in the
    background (the loop never waits on the store); an evaluation's are stored before its checkpoints exist."""
    return lambda step, metrics: tracker.log_metrics({f"step.{k}": v for k, v in metrics.items()}, step=step,
                                                     background="train_loss" in metrics)


def parameter_counts(model: torch.nn.Module) -> dict[str, float]:
    """Trainable and total parameters: shows at a glance whether a run trained LoRA adapters or every weight."""
    params = list(model.parameters())
    trainable, total = sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
    return {"model.trainable_params": trainable, "model.total_params": total,
            "model.trainable_share": trainable / max(total, 1)}


def with_objective(metrics: dict[str, float], key: str) -> dict[str, float]:
    """An epoch's metrics plus ``objective`` (= the monitored one): one key to chart across runs and tasks."""
    return {**metrics, "objective": metrics[key]} if key in metrics else metrics


def run(cfg: DictConfig) -> float:
    """Run one experiment; returns ``cfg.objective`` of the best epoch (what sweepers optimise)."""
    multirun = sweep.is_multirun()
    quiet = console.is_quiet(cfg.get("quiet", "auto"), multirun)
    if quiet:
        console.quiet_logging()
    if not multirun:
        cfg = settle(cfg)  # a single run with a bad value fails before an MLflow run exists
    ddp = distributed.init(cfg.distributed.backend, cfg.distributed.timeout_min)
    if not ddp.is_main and not quiet:
        quiet = True
        console.quiet_logging()
    out_dir = writable_dir(ddp.broadcast(cfg.paths.output_dir), "hydra.run.dir")  # every rank: rank 0's run dir
    with run_dir_lock(out_dir, ddp.is_main):
        return _run(cfg, out_dir, ddp, multirun, quiet)


@contextlib.contextmanager
def run_dir_lock(out_dir: Path, is_main: bool) -> Iterator[None]:
    """One run per run dir: a second one would write over the first's checkpoints and logs. The OS drops the lock
    when its process dies (also on SIGKILL), so ``resume=auto`` after a crash finds it free."""
    if not is_main:
        yield
        return
    lock = FileLock(out_dir / RUN_LOCK)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ConfigError(f"hydra.run.dir={out_dir}: in use by another run; wait for it to end or pick another "
                          f"run dir") from None
    try:
        yield
    finally:
        lock.release()


def _run(cfg: DictConfig, out_dir: Path, ddp, multirun: bool, quiet: bool) -> float:
    """The run, holding its run dir: output dirs probed ▸ resume point (settings unchanged) ▸ tracker ▸ (sweep jobs:
    settle) ▸ checkpoint checksums ▸ ``Run`` ▸ console summary."""
    if ddp.is_main:  # where checkpoints and tokenized data go: unwritable is one line now, not after an epoch
        writable_dir(out_dir / "checkpoints", "hydra.run.dir")
        if cfg.data.get("cache_dir"):
            writable_dir(cfg.data.cache_dir, "data.cache_dir")
    resume_dir = resolve_resume(cfg.get("resume"), out_dir)
    data_files = {k: cfg.data.get(k) for k in ("train_file", "val_file", "test_file")}
    # A single run's config is settled: a changed resume is refused before its MLflow run is reopened.
    changes = resume_changes(cfg, resume_dir, data_files) if resume_dir and not multirun else {}
    resumed_run_id = checkpoint_run_id(resume_dir)
    tracker = instantiate(cfg.tracking, enabled=cfg.tracking.enabled and ddp.is_main)  # one run, whatever N
    parent_run_id, sweep_tags = sweep.job_context(tracker) if ddp.is_main else (None, {})
    tracker.start({}, tags={**hydra_tags(), **sweep_tags, "task": cfg.task.name},
                  parent_run_id=parent_run_id, resume_run_id=resumed_run_id)
    try:
        with tracker.closing(killed=(TrainingInterrupted, KeyboardInterrupt)):
            if multirun:
                cfg = settle_job(cfg, tracker)  # in a sweep a bad value is a FAILED child, and the sweep goes on
                changes = resume_changes(cfg, resume_dir, data_files) if resume_dir else {}
            if resume_dir is not None:
                verify_resumable(resume_dir)  # a corrupt checkpoint fails this run by name, before data loads
                if changes:
                    tracker.set_tags({"resume_changes": describe(changes)[:5000]})
            used = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
            if ddp.is_main:
                OmegaConf.save(used, out_dir / CONFIG_FILE)
                if tracker.run_id != resumed_run_id:  # params are write-once; a reopened run already has them
                    tracker.log_params(used)
                tracker.log_artifact(out_dir / CONFIG_FILE)
            if not quiet:
                console.print_config(used, HydraConfig.get().overrides.task if HydraConfig.initialized() else ())
            ctx = RunContext(out_dir=out_dir, device=rank_device(cfg.hardware.device, ddp), tracker=tracker,
                             ddp=ddp, resume_dir=resume_dir)
            with stop_on_signals() as stop_requested, torch_threads(cfg.hardware.get("torch_threads")):
                summary = Run(cfg, ctx, progress=not quiet).execute(stop_requested, data_files)
    finally:
        distributed.shutdown()
    if ddp.is_main and quiet:
        console.print_run_line(summary, HydraConfig.get().job.num if multirun else None)
    elif ddp.is_main:
        console.print_summary(summary)
    return summary["objective"]


class Run:
    """The part of a run inside the tracker: task data ▸ model ▸ trainer ▸ finalize (torchtune-recipe style)."""

    def __init__(self, cfg: DictConfig, ctx: RunContext, progress: bool = True):
        self.cfg, self.ctx, self.progress = cfg, ctx, progress
        self.task: Task = get_class(cfg.task._target_)(cfg, ctx)
        self.pretrain: PretrainStage = instantiate(cfg.pretrain)  # none | clm: the base the task's model loads

    def execute(self, stop_requested: Callable[[], bool], data_files: dict[str, Any]) -> dict[str, Any]:
        cfg, ctx, ddp = self.cfg, self.ctx, self.ctx.ddp
        t_start = time.time()
        set_seed(cfg.seed)
        if cfg.trainer.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        data = self.task.build_data()
        prov = provenance(cfg.paths.root_dir, data_files)  # after build_data: demo files exist now
        ctx.tracker.set_provenance(prov, resumed=ctx.resume_dir is not None)
        ctx.tracker.log_datasets(dataset_inputs(data_files, prov))
        # Under DDP rank 0 fills the pretrain cache alone (a single-process stage), the other ranks then hit it.
        # The wait is bounded by distributed.timeout_min.
        if not ddp.is_main:
            ddp.barrier()
        self.task.source = self.pretrain.base(self.task.source, self.task.tokenizer, self.task.pretrain_texts,
                                              seed=cfg.seed, device=ctx.device, hardware=cfg.hardware,
                                              tracker=ctx.tracker, stop_requested=stop_requested,
                                              progress=self.progress)
        if ddp.is_main:
            ddp.barrier()
        model = self.task.build_model()
        ctx.tracker.log_metrics(parameter_counts(model))
        train_loader, val_loader, accum = make_loaders(data, batch_size=cfg.optim.batch_size, hardware=cfg.hardware,
                                                       trainer=cfg.trainer, seed=cfg.seed, ddp=ddp)
        if cfg.trainer.compile:
            model.compile()  # in place: parameter names (and so checkpoints) stay the same
        if ddp.enabled:  # gradients of trainable weights are all-reduced once per optimizer step
            model = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        trainer_cfg, length = resolve_length(cfg.trainer, -(-len(train_loader) // accum))
        if length:
            log.info("trainer.max_epochs=auto: %(steps_per_epoch)d optimizer steps an epoch -> %(max_epochs)d epochs, "
                     "early-stopping patience %(patience)d evaluations", length)
            ctx.tracker.set_tags({f"resolved.{k}": v for k, v in length.items()})
        trainer = Trainer(trainer_cfg, cfg.optim, precision=cfg.hardware.precision, device=ctx.device, ddp=ddp,
                          progress=self.progress)
        checkpoints = Checkpoints(ctx.out_dir / "checkpoints", keep=cfg.trainer.save_top_k,
                                  mode=cfg.trainer.monitor_mode, tokenizer=self.task.tokenizer,
                                  meta={"mlflow_run_id": ctx.tracker.run_id, "monitor": cfg.trainer.monitor,
                                        "data_sha256": {k: v for k, v in prov.items() if k.startswith("data.")}},
                                  resume_from=ctx.resume_dir, ddp=ddp)
        trainer.setup(Fit(model, self.task.loss(), train_loader, shard(val_loader, ddp), self.task.metrics, accum),
                      checkpoints)
        if ctx.resume_dir is not None:
            ctx.tracker.set_tags({"resumed_from": str(ctx.resume_dir)})
        state = trainer.fit(on_epoch_end=lambda st, metrics: ctx.tracker.log_metrics(
                                with_objective(epoch_curves(metrics), cfg.objective), step=st.epoch),
                            on_step=step_logger(ctx.tracker),
                            stop_requested=stop_requested)
        trainer.finish()
        if state.best_epoch is None:
            raise RuntimeError(f"no epoch produced a usable {cfg.trainer.monitor}; nothing to report")
        objective = state.best[cfg.objective]
        if not ddp.is_main:  # rank 0 reports and exports
            return {"objective": objective}
        summary = {
            "task": cfg.task.name, "objective_key": cfg.objective, "objective": objective,
            "best_epoch": state.best_epoch, "best_step": state.best_step, "best": state.best,
            "stop_reason": state.stop_reason, "epochs_run": len(state.history), "history": state.history,
            "val_checks": state.checks, "wall_time_s": time.time() - t_start,
            "fit_time_s": state.fit_time_s, "train_samples_per_s": state.train_samples_per_s,
            "optimizer_steps": state.step, "skipped_steps": state.skipped_steps, "accumulation_steps": accum,
            "max_epochs": trainer_cfg.max_epochs,
            "device": str(ctx.device), "world_size": ddp.world_size,
            "resumed_from": str(ctx.resume_dir) if ctx.resume_dir else None, "provenance": prov,
        }
        atomic_write_json(ctx.out_dir / "training_summary.json", summary)
        ctx.tracker.set_tags({"stop_reason": state.stop_reason, "best_epoch": state.best_epoch,
                              "best_step": state.best_step})
        ctx.tracker.log_metrics({"best.objective": objective}, step=state.best_epoch)
        out = self.task.finalize(trainer.core, val_loader, summary)
        artifacts = [ctx.out_dir / "training_summary.json", *out.get("artifacts", [])]
        for path in artifacts:  # the run dir's layout, mirrored (checkpoints/model_best.pt -> checkpoints/)
            parent = Path(path).resolve().relative_to(ctx.out_dir.resolve()).parent
            ctx.tracker.log_artifact(path, None if parent == Path(".") else str(parent))
        if (ctx.out_dir / ".hydra").is_dir():
            ctx.tracker.log_artifact(ctx.out_dir / ".hydra", "hydra")
        result = {**summary, "wall_time_s": time.time() - t_start, "metrics": out["metrics"],
                  "run_dir": str(ctx.out_dir), "run_id": ctx.tracker.run_id, "tracking_uri": ctx.tracker.uri,
                  "model_uri": out.get("model_uri"), "artifacts": [str(p) for p in artifacts]}
        ctx.tracker.set_note(console.run_line(result) + (f"\n\nModel: `{result['model_uri']}`"
                                                         if result["model_uri"] else ""))
        return result
