"""The recipe of one run, in torchtune's sense: ``setup`` builds every component onto the object (data, the pretrain
stage's base, model, loaders, trainer; one ``_setup_*`` method each), ``train`` fits, ``finalize`` hands the best
model to the task for reports and export and returns the ``RunResult``. ``lifecycle.run`` settles the config, opens
the MLflow run and the run dir around it."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel
from transformers import set_seed

from loralab.config import RunConf
from loralab.config.changes import describe
from loralab.core.checkpoint import Checkpoints
from loralab.core.loaders import make_loaders, padding_shares, shard
from loralab.core.trainer import FitInputs, Trainer
from loralab.fs import atomic_write_json
from loralab.pretrain import PretrainStage
from loralab.reporting import console
from loralab.reporting.provenance import provenance
from loralab.result import RunResult
from loralab.resume import CONFIG_FILE, checkpoint_run_id
from loralab.tasks.base import RunContext, Task

log = logging.getLogger(__name__)


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


class Recipe:
    """One run inside its MLflow run, a recipe in torchtune's sense: ``setup`` builds every component onto
    ``self`` (one ``_setup_*`` method each), ``train`` fits, ``finalize`` hands the best model to the task for
    reports and export and returns the ``RunResult``."""

    def __init__(self, conf: RunConf, ctx: RunContext, progress: bool = True):
        self.conf, self.ctx, self.progress = conf, ctx, progress
        self.task: Task = get_class(conf.task._target_)(conf, ctx)
        self.pretrain: PretrainStage = conf.pretrain.stage()
        self.t_start = time.time()
        self.stage_seconds: dict[str, float] = {}  # where the wall goes: console summary and MLflow time.* metrics

    @contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + time.perf_counter() - t

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
        with self._stage("data"):
            self._setup_data()
            self._setup_finetuning()
        with self._stage("pretrain"):
            self._setup_base(stop_requested)
        with self._stage("model"):
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

    def _setup_finetuning(self) -> None:
        """``lora.enabled=auto``: the training set's size decides between LoRA and training every weight. The
        decision lands on the one ``RunConf`` the task also reads (model, export); the saved and logged config
        keeps ``auto``, the run's ``resolved.*`` tags say what it became."""
        conf, rows = self.conf, len(self.data.train)  # type: ignore[arg-type]  # map-style: sized
        lora, optim = conf.lora.for_train_rows(rows, conf.optim)
        if lora is conf.lora:
            return
        conf.lora, conf.optim = lora, optim
        log.info(
            "lora.enabled=auto: %d training rows %s lora.full_from_rows=%d -> %s at lr %g",
            rows,
            "<" if lora.enabled else ">=",
            lora.full_from_rows,
            "LoRA adapters" if lora.enabled else "every weight trains (lora.r and the other adapter keys go unused)",
            optim.lr,
        )
        self.ctx.tracker.set_tags({"resolved.lora.enabled": lora.enabled, "resolved.optim.lr": optim.lr})

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
        self.padding_share = padding_shares(self.data, self.train_loader, self.val_loader)
        if self.padding_share:
            log.info(
                "pad tokens in padded batches: %.1f%% of train (epoch 1%s), %.1f%% of val; hardware.packing=%s",
                100 * self.padding_share["train"],
                f", rank {ddp.rank}'s shard" if ddp.enabled else "",
                100 * self.padding_share["val"],
                conf.hardware.packing,
            )
            self.ctx.tracker.log_metrics({f"data.{k}_padding_share": v for k, v in self.padding_share.items()})

    def _setup_trainer(self) -> None:
        conf, ctx = self.conf, self.ctx
        self.trainer_conf, length = conf.trainer.for_epoch_length(-(-len(self.train_loader) // self.accum))
        if "max_epochs" in length:
            log.info(
                "trainer.max_epochs=auto: %(steps_per_epoch)d optimizer steps an epoch -> %(max_epochs)d epochs, "
                "early-stopping patience %(patience)d evaluations",
                length,
            )
        if length.get("val_check_interval"):
            log.info("trainer.val_check_interval=auto: a val check every %d steps", length["val_check_interval"])
        if length:
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
        with self._stage("fit"):
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
            padding_share=self.padding_share,
            packing=conf.hardware.packing,
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
        with self._stage("finalize"):
            out = self.task.finalize(self.trainer.core, self.val_loader, result)
        artifacts = [summary_file, *out.artifacts]
        for path in artifacts:  # the run dir's layout, mirrored (checkpoints/model_best.pt -> checkpoints/)
            parent = Path(path).resolve().relative_to(ctx.out_dir.resolve()).parent
            ctx.tracker.log_artifact(path, None if parent == Path(".") else str(parent))
        if (ctx.out_dir / ".hydra").is_dir():
            ctx.tracker.log_artifact(ctx.out_dir / ".hydra", "hydra")
        result.metrics, result.model_uri, result.artifacts = out.metrics, out.model_uri, [str(p) for p in artifacts]
        result.wall_time_s = time.time() - self.t_start
        result.stage_seconds = {k: round(v, 2) for k, v in self.stage_seconds.items()}
        ctx.tracker.log_metrics({f"time.{k}_s": v for k, v in result.stage_seconds.items()})
        log.info("wall %.0f s: %s", result.wall_time_s, result.stage_line())
        ctx.tracker.set_note(
            console.run_line(result) + (f"\n\nModel: `{result.model_uri}`" if result.model_uri else "")
        )
        return result
