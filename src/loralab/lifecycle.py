"""One run of any task: settle the config ▸ preflight ▸ tracker ▸ the ``Recipe`` (``loralab/recipe.py``: setup ▸
train ▸ finalize), always closing the run.

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
from pathlib import Path
from typing import Callable, Iterator, cast

import torch
from filelock import FileLock, Timeout
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from loralab import config
from loralab.config import RunConf
from loralab.config.tasks import QwenModelConf, RecordsDataConf
from loralab.core import distributed
from loralab.core.checkpoint import verify_resumable
from loralab.core.device import resolve_device
from loralab.errors import CheckpointError, ConfigError, TrainingInterrupted
from loralab.fs import atomic_write_text, writable_dir
from loralab.models.memory import check_memory
from loralab.recipe import Recipe
from loralab.reporting import console
from loralab.resume import checkpoint_run_id, interpolated_keys, resolve_resume, resume_changes
from loralab.tasks.base import RunContext
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
