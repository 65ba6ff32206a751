"""One run of any task: settle the config ▸ preflight ▸ tracker ▸ the ``Run`` recipe (setup ▸ train ▸ finalize),
always closing the run.

The MLflow run ends FINISHED, FAILED (with the error as tags) or KILLED (SIGINT/SIGTERM, after writing ``last``),
whatever the task. Tasks (``conf/task``) only say what differs; resume, signals, top-k checkpoints, DDP, sweep
parent/child runs, provenance and the memory preflight are all here, so every task has them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, cast

import torch
from filelock import FileLock, Timeout
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from transformers import set_seed

from loralab import config
from loralab.config import RunConf
from loralab.config.changes import describe
from loralab.config.tasks import QwenModelConf, RecordsDataConf
from loralab.core import distributed
from loralab.core.checkpoint import Checkpoints, verify_resumable
from loralab.core.device import resolve_device
from loralab.core.loaders import make_loaders, shard
from loralab.core.trainer import FitInputs, Trainer
from loralab.errors import CheckpointError, ConfigError, TrainingInterrupted
from loralab.fs import atomic_write_json, atomic_write_text, writable_dir
from loralab.models.memory import check_memory
from loralab.pretrain import PretrainStage
from loralab.reporting import console
from loralab.reporting.provenance import provenance
from loralab.result import RunResult
from loralab.resume import CONFIG_FILE, checkpoint_run_id, interpolated_keys, resolve_resume, resume_changes
from loralab.tasks.base import RunContext, Task
from loralab.tracking import sweep

log = logging.getLogger(__name__)

RUN_LOCK = ".run.lock"  # held by the run using a run dir
RUN_ID_FILE = ".mlflow_run_id"  # the MLflow run the latest attempt in a run dir opened


def settle(cfg: DictConfig) -> RunConf:
    """The config the run will use, as its task's typed root: checked, ``auto`` resolved (and logged), memory
    preflight passed. Raises ``ConfigError`` (one line) before anything loads."""
    checked, resolved = config.resolve_hardware(config.check(cfg))
    if resolved:
        log.info("hardware auto values resolved: %s", ", ".join(f"{k}={v}" for k, v in resolved.items()))
    conf = config.typed(checked)
    if isinstance(conf.model, QwenModelConf):  # a transformer, not the MLP
        check_memory(
            conf.model, conf.lora, conf.hardware, num_labels=len(conf.output_names()), batch_size=conf.optim.batch_size
        )
    if isinstance(conf.data, RecordsDataConf) and conf.data.cache_dir:  # tokenized records go there
        writable_dir(conf.data.cache_dir, "data.cache_dir")
    return conf


def settle_job(cfg: DictConfig, tracker) -> RunConf:
    """``settle`` inside a sweep job's MLflow run; a job that fails it still shows the values it was given."""
    try:
        return settle(cfg)
    except ConfigError:
        with contextlib.suppress(Exception):  # a value that does not even resolve is already named in the error
            tracker.log_params(OmegaConf.to_container(cfg, resolve=True))
        raise


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
    return {
        "hydra.overrides": " ".join(hc.overrides.task) or "(none)",
        "hydra.job.num": str(cast(DictConfig, hc.job).get("num", 0)),
    }


def dataset_inputs(data_files: dict[str, Any], prov: dict[str, str]) -> dict[str, tuple[str, str]]:
    """``{"train"|"val"|"test": (path, sha256)}`` for the data files that exist (provenance hashed them)."""
    return {
        key.removesuffix("_file"): (path, prov[f"data.{key}.sha256"])
        for key, path in data_files.items()
        if f"data.{key}.sha256" in prov
    }


def epoch_curves(metrics: dict[str, Any]) -> dict[str, Any]:
    """An epoch's metrics as MLflow curves at step = epoch: the optimizer step count is not a curve of its own."""
    return {k: v for k, v in metrics.items() if k != "step"}


def step_logger(tracker) -> Callable[[int, dict[str, float]], None]:
    """The trainer's ``on_step``: ``step.<name>`` curves at step = optimizer step. Train numbers are queued in the
    background (the loop never waits on the store); an evaluation's are stored before its checkpoints exist."""
    return lambda step, metrics: tracker.log_metrics(
        {f"step.{k}": v for k, v in metrics.items()}, step=step, background="train_loss" in metrics
    )


def parameter_counts(model: torch.nn.Module) -> dict[str, float]:
    """Trainable and total parameters: shows at a glance whether a run trained LoRA adapters or every weight."""
    params = list(model.parameters())
    trainable, total = sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
    return {
        "model.trainable_params": trainable,
        "model.total_params": total,
        "model.trainable_share": trainable / max(total, 1),
    }


def with_objective(metrics: dict[str, float], key: str) -> dict[str, float]:
    """An epoch's metrics plus ``objective`` (= the monitored one): one key to chart across runs and tasks."""
    return {**metrics, "objective": metrics[key]} if key in metrics else metrics


def run(cfg: DictConfig) -> float:
    """Run one experiment; returns the best evaluation's ``objective`` (what sweepers optimise).

    A single run settles its config first, so a bad value fails before an MLflow run exists; a sweep job settles
    inside its MLflow run, so a bad value is a FAILED child and the sweep goes on. Until then only keys every task
    has are read (``quiet``, ``distributed``, ``paths``, ``resume``, ``tracking``, ``task``)."""
    multirun = sweep.is_multirun()
    quiet = console.is_quiet(cfg.quiet, multirun)
    if quiet:
        console.quiet_logging()
    conf = None if multirun else settle(cfg)
    ddp = distributed.init(cfg.distributed.backend, cfg.distributed.timeout_min)
    if not ddp.is_main and not quiet:
        quiet = True
        console.quiet_logging()
    out_dir = writable_dir(ddp.broadcast(cfg.paths.output_dir), "hydra.run.dir")  # every rank: rank 0's run dir
    with run_dir_lock(out_dir, ddp.is_main):
        if ddp.is_main:  # where checkpoints go: unwritable is one line now, not after an epoch
            writable_dir(out_dir / "checkpoints", "hydra.run.dir")
            for tmp in out_dir.glob("*.*-*.tmp"):  # a file an earlier attempt was writing when it was killed
                tmp.unlink()
        resume_dir = resolve_resume(cfg.resume, out_dir)
        # A single run is settled: a changed or corrupt resume is refused before its MLflow run is reopened (a
        # FINISHED run stays FINISHED).
        changes = resume_changes(conf, interpolated_keys(cfg), resume_dir) if conf and resume_dir else {}
        tracker = instantiate(cfg.tracking, enabled=cfg.tracking.enabled and ddp.is_main)  # one run, whatever N
        reopened = checkpoint_run_id(resume_dir)
        if conf and resume_dir:
            try:
                verify_resumable(resume_dir)
            except CheckpointError as err:  # the run it would continue says why, unless it had FINISHED
                tracker.fail_unfinished(reopened, err)
                raise
        parent_run_id, sweep_tags = sweep.job_context(tracker) if ddp.is_main else (None, {})
        close_unfinished(tracker, out_dir, reopened)
        tracker.start(
            {},
            tags={
                **hydra_tags(),
                **sweep_tags,
                "task": cfg.task.name,
                "process": f"{socket.gethostname()}:{os.getpid()}",
            },
            parent_run_id=parent_run_id,
            resume_run_id=reopened,
        )
        if ddp.is_main and tracker.run_id:
            atomic_write_text(out_dir / RUN_ID_FILE, tracker.run_id)
        try:
            with tracker.closing(killed=(TrainingInterrupted, KeyboardInterrupt)):
                if conf is None:
                    conf = settle_job(cfg, tracker)
                    changes = resume_changes(conf, interpolated_keys(cfg), resume_dir) if resume_dir else {}
                    if resume_dir:  # inside the job's MLflow run: a corrupt checkpoint is a FAILED child
                        verify_resumable(resume_dir)
                ctx = RunContext(
                    out_dir=out_dir,
                    device=rank_device(conf.hardware.device, ddp),
                    tracker=tracker,
                    ddp=ddp,
                    resume_dir=resume_dir,
                )
                recipe = Recipe(conf, ctx, progress=not quiet)
                recipe.prepare(changes, show_config=not quiet)
                with stop_on_signals() as stop_requested, torch_threads(conf.hardware.torch_threads):
                    recipe.setup(stop_requested)
                    recipe.train(stop_requested)
                    result = recipe.finalize()
        finally:
            distributed.shutdown()
    if ddp.is_main and quiet:
        console.print_run_line(result, HydraConfig.get().job.num if multirun else None)
    elif ddp.is_main:
        console.print_summary(result)
    return result.objective


def close_unfinished(tracker, out_dir: Path, reopened: str | None) -> None:
    """The MLflow run an earlier attempt in this run dir opened and never closed (killed before its first
    checkpoint, or while pretraining) is marked KILLED, unless this attempt reopens it to resume."""
    marker = out_dir / RUN_ID_FILE
    if marker.is_file() and (run_id := marker.read_text().strip()) and run_id != reopened:
        tracker.close_if_running(run_id, f"killed before its first checkpoint; {out_dir} was run again")


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
        raise ConfigError(
            f"hydra.run.dir={out_dir}: in use by another run; wait for it to end or pick another run dir"
        ) from None
    try:
        yield
    finally:
        lock.release()


class Recipe:
    """One run inside its MLflow run, a recipe in torchtune's sense: ``setup`` builds every component onto
    ``self`` (one ``_setup_*`` method each), ``train`` fits, ``finalize`` hands the best model to the task for
    reports and export and returns the ``RunResult``."""

    def __init__(self, conf: RunConf, ctx: RunContext, progress: bool = True):
        self.conf, self.ctx, self.progress = conf, ctx, progress
        self.task: Task = get_class(conf.task._target_)(conf, ctx)
        self.pretrain: PretrainStage = conf.pretrain.stage()
        self.t_start = time.time()

    def prepare(self, changes: dict[str, Any], show_config: bool) -> None:
        """Before anything loads: save and log the config exactly as used (the checkpoint it resumes is verified)."""
        conf, ctx = self.conf, self.ctx
        if ctx.resume_dir is not None and changes:
            ctx.tracker.set_tags({"resume_changes": describe(changes)[:5000]})
        used = conf.as_dict()
        if ctx.ddp.is_main:
            OmegaConf.save(used, ctx.out_dir / CONFIG_FILE)
            if ctx.tracker.run_id != checkpoint_run_id(
                ctx.resume_dir
            ):  # params are write-once; a reopened run has them
                ctx.tracker.log_params(used)
            ctx.tracker.log_artifact(ctx.out_dir / CONFIG_FILE)
        if show_config:
            console.print_config(used, HydraConfig.get().overrides.task if HydraConfig.initialized() else ())

    def setup(self, stop_requested: Callable[[], bool]) -> None:
        self._setup_seed()
        self._setup_data()
        self._setup_base(stop_requested)
        self._setup_model()
        self._setup_loaders()
        self._setup_trainer()

    def _setup_seed(self) -> None:
        set_seed(self.conf.seed)
        if self.conf.trainer.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

    def _setup_data(self) -> None:
        ctx = self.ctx
        self.data = self.task.build_data()
        self.data_files = self.conf.data.files()
        self.provenance = provenance(self.conf.paths["root_dir"], self.data_files)  # after build_data: demo files exist
        ctx.tracker.set_provenance(self.provenance, resumed=ctx.resume_dir is not None)
        ctx.tracker.log_datasets(dataset_inputs(self.data_files, self.provenance))

    def _setup_base(self, stop_requested: Callable[[], bool]) -> None:
        """The pretrain stage may replace the task's base. Under DDP rank 0 fills the pretrain cache alone (a
        single-process stage), the other ranks then hit it; the wait is bounded by distributed.timeout_min."""
        conf, ctx, ddp = self.conf, self.ctx, self.ctx.ddp
        if not ddp.is_main:
            ddp.barrier()
        self.task.source = self.pretrain.base(
            self.task.source,
            self.task.tokenizer,
            self.task.pretrain_texts,
            seed=conf.seed,
            device=ctx.device,
            hardware=conf.hardware,
            tracker=ctx.tracker,
            stop_requested=stop_requested,
            progress=self.progress,
        )
        if ddp.is_main:
            ddp.barrier()

    def _setup_model(self) -> None:
        ctx = self.ctx
        model = self.task.build_model()
        ctx.tracker.log_metrics(parameter_counts(model))
        if self.conf.trainer.compile:
            model.compile()  # in place: parameter names (and so checkpoints) stay the same
        if ctx.ddp.enabled:  # gradients of trainable weights are all-reduced once per optimizer step
            model = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        self.model = model

    def _setup_loaders(self) -> None:
        conf, ddp = self.conf, self.ctx.ddp
        self.train_loader, self.val_loader, self.accum = make_loaders(
            self.data,
            batch_size=conf.optim.batch_size,
            hardware=conf.hardware,
            trainer=conf.trainer,
            seed=conf.seed,
            ddp=ddp,
        )

    def _setup_trainer(self) -> None:
        conf, ctx = self.conf, self.ctx
        self.trainer_conf, length = conf.trainer.for_epoch_length(-(-len(self.train_loader) // self.accum))
        if length:
            log.info(
                "trainer.max_epochs=auto: %(steps_per_epoch)d optimizer steps an epoch -> %(max_epochs)d epochs, "
                "early-stopping patience %(patience)d evaluations",
                length,
            )
            ctx.tracker.set_tags({f"resolved.{k}": v for k, v in length.items()})
        self.trainer = Trainer(
            self.trainer_conf,
            conf.optim,
            precision=conf.hardware.precision,
            device=ctx.device,
            ddp=ctx.ddp,
            progress=self.progress,
        )
        data_sha256 = {k: v for k, v in self.provenance.items() if k.startswith("data.")}
        checkpoints = Checkpoints(
            ctx.out_dir / "checkpoints",
            keep=conf.trainer.save_top_k,
            mode=conf.trainer.monitor_mode,
            tokenizer=self.task.tokenizer,
            meta={"mlflow_run_id": ctx.tracker.run_id, "monitor": conf.trainer.monitor, "data_sha256": data_sha256},
            resume_from=ctx.resume_dir,
            ddp=ctx.ddp,
        )
        self.trainer.setup(
            FitInputs(
                self.model,
                self.task.loss(),
                self.train_loader,
                shard(self.val_loader, ctx.ddp),
                self.task.metrics,
                self.accum,
            ),
            checkpoints,
        )
        if ctx.resume_dir is not None:
            ctx.tracker.set_tags({"resumed_from": str(ctx.resume_dir)})

    def train(self, stop_requested: Callable[[], bool]) -> None:
        """Fit to the end (max_epochs, max_steps, early stopping), the best evaluation's weights back in the model."""
        tracker, objective = self.ctx.tracker, self.conf.objective
        self.state = self.trainer.fit(
            on_epoch_end=lambda st, metrics: tracker.log_metrics(
                with_objective(epoch_curves(metrics), objective), step=st.epoch
            ),
            on_step=step_logger(tracker),
            stop_requested=stop_requested,
        )
        self.trainer.finish()
        if self.state.best_epoch is None:
            raise RuntimeError(f"no epoch produced a usable {self.conf.trainer.monitor}; nothing to report")

    def finalize(self) -> RunResult:
        """The result; on rank 0 also the task's reports and export, the artifacts and the run's note."""
        conf, ctx, st = self.conf, self.ctx, self.state
        assert st.best_epoch is not None and st.best_step is not None  # train() raised otherwise
        result = RunResult(
            task=str(conf.task.name),
            objective_key=conf.objective,
            objective=st.best[conf.objective],
            best_epoch=st.best_epoch,
            best_step=st.best_step,
            best=st.best,
            stop_reason=st.stop_reason,
            epochs_run=len(st.history),
            history=st.history,
            val_checks=st.checks,
            wall_time_s=time.time() - self.t_start,
            fit_time_s=st.fit_time_s,
            train_samples_per_s=st.train_samples_per_s,
            optimizer_steps=st.step,
            skipped_steps=st.skipped_steps,
            accumulation_steps=self.accum,
            max_epochs=self.trainer_conf.max_epochs,
            device=str(ctx.device),
            world_size=ctx.ddp.world_size,
            resumed_from=str(ctx.resume_dir) if ctx.resume_dir else None,
            provenance=self.provenance,
            run_dir=str(ctx.out_dir),
            run_id=ctx.tracker.run_id,
            tracking_uri=ctx.tracker.uri,
        )
        if not ctx.ddp.is_main:  # rank 0 reports and exports
            return result
        summary_file = ctx.out_dir / "training_summary.json"
        atomic_write_json(summary_file, result.training_summary())
        ctx.tracker.set_tags({"stop_reason": st.stop_reason, "best_epoch": st.best_epoch, "best_step": st.best_step})
        ctx.tracker.log_metrics({"best.objective": result.objective}, step=st.best_epoch)
        out = self.task.finalize(self.trainer.core, self.val_loader, result)
        artifacts = [summary_file, *out.artifacts]
        for path in artifacts:  # the run dir's layout, mirrored (checkpoints/model_best.pt -> checkpoints/)
            parent = Path(path).resolve().relative_to(ctx.out_dir.resolve()).parent
            ctx.tracker.log_artifact(path, None if parent == Path(".") else str(parent))
        if (ctx.out_dir / ".hydra").is_dir():
            ctx.tracker.log_artifact(ctx.out_dir / ".hydra", "hydra")
        result.metrics, result.model_uri, result.artifacts = out.metrics, out.model_uri, [str(p) for p in artifacts]
        result.wall_time_s = time.time() - self.t_start
        ctx.tracker.set_note(
            console.run_line(result) + (f"\n\nModel: `{result.model_uri}`" if result.model_uri else "")
        )
        return result
