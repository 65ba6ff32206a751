"""Schemas of the groups every task shares (conf/<group>/*.yaml): field names are the YAML keys, types are what
OmegaConf enforces on merge, ``knob(...)`` rules are the ranges. Values stay in the YAML (defaults are MISSING).

These dataclasses are also the objects a run reads: ``config.typed`` turns the checked config into instances of
them, and values derived from several keys are methods here (``TrainerConf.for_epoch_length``,
``RunConf.accumulation_steps``), not free functions next to their one caller.

Closed choices are ``Choice`` enums (``config/choices.py``): they read as their string value everywhere.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional

from omegaconf import MISSING

from loralab.config.choices import (
    Backend,
    BaselineName,
    BinCuts,
    CalibrationMethod,
    DecisionMethod,
    EnsembleMethod,
    EnsembleSelect,
    MonitorMode,
    Precision,
    Preflight,
    PretrainName,
    PretrainTrain,
)
from loralab.config.rules import (
    DEVICE,
    GATE,
    LORA_TARGETS,
    MODEL_ALIAS,
    NOT_EMPTY,
    RESUME_ALLOW,
    SCHEDULER,
    T_BOUNDS,
    ZIP_PARTS_KNOWN,
    ZIP_PARTS_LOADABLE,
    auto_or,
    ge,
    gt,
    interval,
    is_int,
    is_number,
    knob,
    one_of,
)
from loralab.core.sampler import accumulation_steps


@dataclass
class TaskConf:
    """``conf/task``: the task class (``loralab.tasks.base.Task``), which owns its root schema and rules."""

    _target_: str = MISSING
    name: str = MISSING  # the class's ``name``: tags, reports and the exported metadata read it


@dataclass
class LoraConf:
    """``enabled`` says whether LoRA is on (lora=default: true, lora=none: false, lora=auto: the training set's
    size decides); the other keys stay either way."""

    _target_: str = MISSING
    _convert_: str = MISSING
    enabled: Any = knob(auto_or(lambda v: isinstance(v, bool), "true or false"))  # auto: for_train_rows decides
    task_type: str = knob(one_of("SEQ_CLS"))  # passed verbatim to peft.LoraConfig
    r: Optional[int] = knob(gt(0))
    lora_alpha: int = knob(gt(0))
    lora_dropout: float = knob(interval("[0, 1)"))
    target_modules: Any = knob(LORA_TARGETS)  # null | all-linear | a list of module names
    bias: str = knob(one_of("none", "all", "lora_only"))  # passed verbatim to peft.LoraConfig
    full_from_rows: int = knob(ge(1))  # enabled=auto: from this many training rows on (as trained: oversampled)
    full_lr: float = knob(gt(0))  # enabled=auto: optim.lr when every weight trains

    def for_train_rows(self, rows: int, optim: OptimConf) -> tuple["LoraConf", OptimConf]:
        """``enabled=auto`` decided for a training set of ``rows``: LoRA (at ``optim.lr``) under ``full_from_rows``,
        every weight at ``full_lr`` from there on. Any other ``enabled`` comes back as it is."""
        if self.enabled != "auto":
            return self, optim
        full = rows >= self.full_from_rows
        return dataclasses.replace(self, enabled=not full), optim.with_lr(self.full_lr) if full else optim


@dataclass
class PretrainLoraConf:
    """The pretrain stage's own adapters (``pretrain.train: lora``), merged into the base it saves."""

    r: int = knob(gt(0))
    lora_alpha: int = knob(gt(0))
    lora_dropout: float = knob(interval("[0, 1)"))
    target_modules: List[str] = knob(NOT_EMPTY)


@dataclass
class PretrainConf:
    """``conf/pretrain``: ``none`` keeps ``clm``'s keys and uses none of them."""

    _target_: str = MISSING  # the stage class (loralab.pretrain.NoPretrain | CausalLMPretrain), built on this
    name: PretrainName = MISSING
    epochs: int = knob(ge(1))
    min_steps: int = knob(ge(0))  # 0: off
    max_steps: Optional[int] = knob(ge(1))  # a budget: the stage ends there whatever the corpus size; null: off
    lr: float = knob(gt(0))
    batch_size: int = knob(gt(0))
    weight_decay: float = knob(ge(0))
    warmup_ratio: float = knob(interval("[0, 1)"))
    holdout: float = knob(interval("(0, 1)"))
    splits: List[str] = knob(each=one_of("train", "val"))  # never test texts
    extra_files: List[str] = MISSING  # each must exist when the stage is on: a cross-field rule
    train: PretrainTrain = MISSING
    lora: PretrainLoraConf = MISSING
    cache_dir: str = MISSING
    optimizer: "OptimizerConf" = MISSING  # lr and weight_decay follow the keys above (${..lr})
    scheduler: str = knob(SCHEDULER)
    max_grad_norm: Optional[float] = knob(gt(0))

    def stage(self) -> Any:
        """The stage object (``_target_``, a ``loralab.pretrain.PretrainStage``) that reads these settings."""
        from hydra.utils import get_class

        return get_class(self._target_)(self)

    def optim(self) -> "OptimConf":
        """The stage's optimizer settings, as the run's ``optim`` group spells them."""
        return OptimConf(
            lr=self.lr,
            batch_size=self.batch_size,
            weight_decay=self.weight_decay,
            warmup_ratio=self.warmup_ratio,
            scheduler=self.scheduler,
            max_grad_norm=self.max_grad_norm,
            optimizer=self.optimizer,
        )

    def trainer(self, steps_per_epoch: int) -> "TrainerConf":
        """The stage's loop: every epoch runs (``epochs``, or more where a small corpus needs them to reach
        ``min_steps`` optimizer steps) and the epoch with the lowest held-out perplexity is kept."""
        epochs = max(self.epochs, math.ceil(self.min_steps / max(steps_per_epoch, 1)))
        loop = TrainerConf(
            max_epochs=epochs,
            min_steps=1,
            monitor="val_perplexity",
            monitor_mode=MonitorMode.min,
            early_stopping=EarlyStoppingConf(patience=epochs, patience_steps=0, min_delta=0.0, smoothing=0.0, grace=0),
            save_top_k=1,
            group_by_length=True,
            compile=False,
            eval_batch_size=4 * self.batch_size,
            deterministic=False,
            gates=None,
            log_every_n_steps=None,
            val_check_interval=None,
            max_steps=self.max_steps,  # the stage evaluates there and keeps its best evaluation
        )
        # Every knob is decided here: a trainer knob added to the schema later fails loudly until the stage sets it.
        unset = [f.name for f in dataclasses.fields(loop) if getattr(loop, f.name) == MISSING]
        if unset:
            raise TypeError(f"PretrainConf.trainer sets no value for trainer keys {unset}")
        return loop


@dataclass
class OptimizerConf:
    _target_: str = MISSING
    _partial_: bool = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING


@dataclass
class OptimConf:
    lr: float = knob(gt(0))
    batch_size: int = knob(gt(0))
    weight_decay: float = knob(ge(0))
    warmup_ratio: float = knob(interval("[0, 1)"))
    scheduler: str = knob(SCHEDULER)
    max_grad_norm: Optional[float] = knob(gt(0))
    optimizer: OptimizerConf = MISSING

    def with_lr(self, lr: float) -> "OptimConf":
        """This optimizer at another learning rate (the ``optimizer`` keys carry it too)."""
        return dataclasses.replace(self, lr=lr, optimizer=dataclasses.replace(self.optimizer, lr=lr))

    def make_optimizer(self, params: Any) -> Any:
        """``optimizer`` (any ``torch.optim`` class by ``_target_``, with its keys) over ``params``."""
        from hydra.utils import instantiate

        return instantiate(self.optimizer)(params=params)


@dataclass
class EarlyStoppingConf:
    patience: int = knob(ge(0))
    patience_steps: int = knob(ge(0))  # with max_epochs=auto: patience in epochs covers at least this many steps
    min_delta: float = knob(ge(0))
    smoothing: float = knob(interval("[0, 1)"))  # EMA weight of past evaluations in the stopping decision
    grace: int = knob(ge(0))  # epochs whose evaluations the stopper does not weigh


@dataclass
class TrainerConf:
    max_epochs: Any = knob(auto_or(lambda v: is_int(v) and v >= 1, "an int >= 1"))  # auto: from min_steps
    min_steps: int = knob(ge(1))
    monitor: str = MISSING  # which names exist depends on the task and labels: a cross-field rule
    monitor_mode: MonitorMode = MISSING
    early_stopping: EarlyStoppingConf = MISSING
    save_top_k: int = knob(ge(1))  # the best epoch is reloaded from the kept checkpoints
    group_by_length: bool = MISSING
    compile: bool = MISSING
    eval_batch_size: int = knob(gt(0))
    deterministic: bool = MISSING
    gates: Optional[Dict[str, str]] = knob(each=GATE)
    log_every_n_steps: Optional[int] = knob(ge(1))  # null: no step-level train metrics
    val_check_interval: Any = knob(auto_or(lambda v: v is None or (is_int(v) and v >= 1), "an int >= 1 or null"))
    max_steps: Optional[int] = knob(ge(1))  # null: max_epochs alone ends training

    def for_epoch_length(self, steps_per_epoch: int) -> tuple["TrainerConf", dict[str, int]]:
        """The values that depend on the length of an epoch, as plain numbers, and what was resolved:

        - ``val_check_interval=auto``: an epoch longer than a quarter of ``min_steps`` gets evenly spaced val checks
          at most that far apart, so a large set's one long epoch is still evaluated, checkpointed and early-stopped
          a few times; shorter epochs are evaluated at their ends only.
        - ``max_epochs=auto``: as many epochs as ``min_steps`` optimizer steps need, and a patience (in evaluations)
          covering at least ``early_stopping.patience_steps`` steps. So a 100-row set gets as many updates as a
          large one, and early stopping waits as many steps on it. A number is used as given."""
        resolved: dict[str, int] = {}
        interval = self.val_check_interval
        if interval == "auto":
            most = math.ceil(self.min_steps / 4)
            checks = math.ceil(steps_per_epoch / most)
            interval = math.ceil(steps_per_epoch / checks) if checks > 1 else None
            resolved["val_check_interval"] = interval or 0  # 0: epoch ends only
        out = dataclasses.replace(self, val_check_interval=interval)
        if self.max_epochs != "auto":
            return out, resolved
        es = self.early_stopping
        epochs = max(1, math.ceil(self.min_steps / steps_per_epoch))
        between_evals = min(interval or steps_per_epoch, steps_per_epoch)
        patience = max(es.patience, math.ceil(es.patience_steps / between_evals))
        out = dataclasses.replace(out, max_epochs=epochs, early_stopping=dataclasses.replace(es, patience=patience))
        return out, {**resolved, "max_epochs": epochs, "patience": patience, "steps_per_epoch": steps_per_epoch}


@dataclass
class HardwareConf:
    """The ``auto`` knobs are ``Any``: ``auto`` or a value, filled by ``resolve_hardware`` from what torch sees."""

    name: str = MISSING
    device: str = knob(DEVICE)
    precision: Precision = MISSING
    micro_batch_size: Any = knob(auto_or(lambda v: v is None or (is_int(v) and v > 0), "an int > 0 or null"))
    gradient_checkpointing: Any = knob(auto_or(lambda v: isinstance(v, bool), "true or false"))
    num_workers: int = knob(ge(0))
    pin_memory: Any = knob(auto_or(lambda v: isinstance(v, bool), "true or false"))
    attn_implementation: str = MISSING
    load_in_4bit: bool = MISSING
    packing: bool = MISSING  # a text model's training micro-batches packed into one row (config/cross.py: hardware)
    memory_gib: Any = knob(auto_or(lambda v: v is None or (is_number(v) and v > 0), "a number > 0 or null"))
    preflight: Preflight = MISSING
    torch_threads: Optional[int] = knob(ge(1))


@dataclass
class TrackingConf:
    _target_: str = MISSING
    uri: str = MISSING
    experiment: str = MISSING
    run_name: str = MISSING
    enabled: bool = MISSING
    system_metrics: bool = MISSING
    artifact_location: Optional[str] = None
    register_as: Optional[str] = None
    alias: Optional[str] = knob(MODEL_ALIAS)  # moved to each new registered version (register_as)


@dataclass
class CalibrationConf:
    method: CalibrationMethod = MISSING
    n_bins: int = knob(ge(1))
    t_bounds: List[float] = knob(T_BOUNDS)


@dataclass
class ExportConf:
    zip: bool = MISSING
    zip_parts: Any = knob(ZIP_PARTS_KNOWN, ZIP_PARTS_LOADABLE)  # auto | a list of parts
    max_size_mb: float = knob(gt(0))
    verify_rows: int = knob(ge(1))
    verify_atol: float = knob(ge(0))


@dataclass
class DistributedConf:
    backend: Backend = MISSING
    timeout_min: float = knob(gt(0))


@dataclass
class BaselineConf:
    name: BaselineName = MISSING
    threads: Optional[int] = knob(ge(1))
    params: Dict[str, Any] = MISSING  # passed to the scikit-learn estimator as is


@dataclass
class EnsembleConf:
    method: EnsembleMethod = MISSING
    folds: int = knob(ge(2))
    grid: int = knob(interval("[2, 101]"))
    select: EnsembleSelect = MISSING


@dataclass
class DecisionConf:
    """``decision=precision``: per-label precision targets; which labels they may name is ``config/cross.py``'s."""

    method: DecisionMethod = MISSING
    targets: Dict[str, float] = knob(NOT_EMPTY, each=interval("(0, 1]"))  # label -> precision to reach
    fallback: str = MISSING  # a label of data.labels without a target
    folds: int = knob(ge(2))  # = ensemble.folds under ensemble=blend (one set of folds for both)
    min_rows: int = knob(ge(1))


SERIALIZE_TARGET = "loralab.data.serialize."


@dataclass
class SerializeConf:
    """``conf/serialize``: the option's ``_target_`` picks its schema (``BY_TARGET``), so each option has its keys."""

    BY_TARGET: ClassVar[dict[str, type]] = {}  # _target_ -> schema; filled below, once the options exist
    _target_: str = MISSING  # checked against BY_TARGET before the merge
    template: str = MISSING  # ${data.template}: its rule is there


@dataclass
class KeyValueConf(SerializeConf):
    digits: Optional[int] = knob(ge(1))


@dataclass
class BinsConf(SerializeConf):
    n_bins: int = knob(interval("[2, 36]"))  # one character per bin: 0-9, a-z
    cuts: BinCuts = MISSING


SerializeConf.BY_TARGET.update(
    {
        SERIALIZE_TARGET + name: schema
        for name, schema in (("Json", SerializeConf), ("KeyValue", KeyValueConf), ("Bins", BinsConf))
    }
)


@dataclass
class RunConf:
    """Keys every task has; a task's root adds its data, model and loss schema."""

    task: TaskConf = MISSING
    data: Any = MISSING  # each task's root schema types data, model and loss (config/tasks.py)
    model: Any = MISSING
    loss: Any = MISSING
    lora: LoraConf = MISSING
    pretrain: PretrainConf = MISSING
    optim: OptimConf = MISSING
    trainer: TrainerConf = MISSING
    hardware: HardwareConf = MISSING
    tracking: TrackingConf = MISSING
    calibration: CalibrationConf = MISSING
    export: ExportConf = MISSING
    distributed: DistributedConf = MISSING
    baseline: Optional[BaselineConf] = MISSING
    ensemble: Optional[EnsembleConf] = None  # conf/ensemble: none (null) | blend (classification, needs a baseline)
    decision: Optional[DecisionConf] = None  # conf/decision: argmax (null) | precision (classification)
    serialize: Optional[SerializeConf] = None  # records -> text (classification); regression experiments drop it
    task_name: str = MISSING
    seed: int = knob(interval("[0, 4294967295]"))  # numpy's seeding range
    resume: Optional[str] = MISSING  # null | auto | a checkpoint dir
    resume_allow_changes: Any = knob(RESUME_ALLOW)
    quiet: Any = knob(auto_or(lambda v: isinstance(v, bool), "true or false"))
    objective: str = MISSING
    paths: Dict[str, Any] = MISSING  # open: the run's directories (conf/train.yaml)

    def output_names(self) -> list[str]:
        """The model's outputs by name (labels, regression targets); [] when the data decides. Each task's root
        says which data key holds them."""
        return []

    def accumulation_steps(self, world_size: int = 1) -> int:
        """Micro-batches per optimizer step on each of ``world_size`` processes, so ``optim.batch_size`` means
        the same global batch on every hardware profile."""
        micro = self.hardware.micro_batch_size
        return accumulation_steps(self.optim.batch_size // world_size, None if micro == "auto" else micro)

    def as_dict(self) -> dict[str, Any]:
        """Plain values (choices as strings): what is saved to the run dir and logged to MLflow."""
        from omegaconf import OmegaConf

        return OmegaConf.to_container(OmegaConf.structured(self), enum_to_str=True)  # type: ignore[return-value]
