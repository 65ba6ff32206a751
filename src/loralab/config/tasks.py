"""One root schema per task: which data, model and loss schema its run takes (``conf/task/<name>.yaml`` picks it).

A group option that fits another task's schema only (``model=mlp`` in a classification run) fails as such, before
its keys are reported one by one; ``OPTION`` names the options a schema stands for in that message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, List, Optional

from omegaconf import MISSING

from loralab.config.choices import DataFormat, Leakage, Split, TruncationSide
from loralab.config.rules import (
    CLASS_WEIGHTS,
    DURATION,
    METRIC_NAME_PART,
    NAMES,
    NOT_EMPTY,
    OVERSAMPLE_TO,
    REGEX,
    STRPTIME,
    ge,
    gt,
    interval,
    knob,
    template_of,
)
from loralab.config.schema import RunConf
from loralab.data.splits import TimeSplit


@dataclass
class SplitDataConf:
    """Train file, optional val file (else a seed-fixed split carved from train) and the leakage policy."""

    demo: bool = MISSING  # true: deterministic files written on first use, so they need not exist yet
    train_file: str = MISSING
    val_file: Optional[str] = MISSING
    test_file: Optional[str] = MISSING  # scored once with the final model; never used to choose or calibrate it
    val_split: float = knob(interval("(0, 1)"))
    leakage: Leakage = MISSING
    max_row_bytes: int = knob(gt(0))

    def files(self) -> dict[str, Optional[str]]:
        """The data files by key (``train_file``...): what provenance hashes and a resume compares."""
        return {"train_file": self.train_file, "val_file": self.val_file, "test_file": self.test_file}


@dataclass
class RecordsDataConf(SplitDataConf):
    OPTION: ClassVar[str] = "demo|jsonl"
    format: DataFormat = MISSING  # auto: by each file's extension
    id_column: str = knob(NOT_EMPTY)  # CSV/Parquet only
    label_column: str = knob(NOT_EMPTY)
    labels: List[str] = knob(NAMES, each=METRIC_NAME_PART)
    template: str = knob(template_of("features"))
    oversample_to: Any = knob(OVERSAMPLE_TO)  # a share in (0, 1), balanced, or null
    allow_null: bool = MISSING
    cache_dir: Optional[str] = MISSING
    # How val is cut and how records are ordered in time (loralab.data.timeorder; rules between them: the task's)
    split: Split = MISSING
    time_key: Optional[str] = knob(NOT_EMPTY)  # null: file order; id: the record id; else a feature name
    time_pattern: Optional[str] = knob(REGEX)
    time_format: Optional[str] = knob(STRPTIME)
    label_horizon: Any = knob(DURATION)
    purge: bool = MISSING
    embargo: Any = knob(DURATION)
    folds: int = knob(ge(2))
    fold: int = knob(ge(0))
    max_train: Optional[int] = knob(ge(1))

    def time_split(self) -> Optional[TimeSplit]:
        """The time ordering and cut, or None where nothing reads times (split=random without a time_key)."""
        if self.split == Split.random and self.time_key is None:
            return None
        return TimeSplit(
            str(self.split),
            self.time_key,
            self.time_pattern,
            self.time_format,
            self.label_horizon,
            self.embargo,
            self.purge,
            self.folds,
            self.fold,
            self.max_train,
        )


@dataclass
class ArticlesDataConf(SplitDataConf):
    OPTION: ClassVar[str] = "articles"
    score_tiers: int = knob(ge(1))
    dimension_names: Optional[List[str]] = knob(
        NAMES, each=METRIC_NAME_PART
    )  # null: those of the first valid train row
    template: str = knob(template_of("title", "content"))


@dataclass
class TabularDataConf:
    OPTION: ClassVar[str] = "marketsentinel"
    demo: bool = MISSING
    train_file: str = MISSING
    val_file: str = MISSING
    schema_file: str = MISSING
    target_names: List[str] = knob(NAMES, each=METRIC_NAME_PART)

    def files(self) -> dict[str, Optional[str]]:
        return {"train_file": self.train_file, "val_file": self.val_file, "test_file": None}


@dataclass
class QwenModelConf:
    OPTION: ClassVar[str] = "hf|tiny_qwen2|qwen2_5_*"
    _target_: str = MISSING
    name: str = MISSING
    hub_id: Optional[str] = MISSING
    path: Optional[str] = MISSING
    pretrained: bool = MISSING
    arch: Optional[str] = MISSING  # needed when pretrained=false: a cross-field rule
    max_length: int = knob(gt(0))
    truncation_side: TruncationSide = MISSING
    tokenizer_vocab_size: int = knob(gt(0))
    trust_remote_code: bool = MISSING


@dataclass
class MLPModelConf:
    OPTION: ClassVar[str] = "mlp"
    _target_: str = MISSING
    hidden_dim: int = knob(gt(0))


@dataclass
class LossConf:
    """A regression loss: any ``torch.nn`` style module built from ``_target_`` alone (MSE, summed head MSE)."""

    OPTION: ClassVar[str] = "mse|head_mse"
    _target_: str = MISSING


@dataclass
class FocalLossConf(LossConf):
    OPTION: ClassVar[str] = "focal"
    gamma: float = knob(ge(0))
    class_weights: Any = knob(CLASS_WEIGHTS)  # length must match data.labels: a cross-field rule


@dataclass
class ClassificationConf(RunConf):
    data: RecordsDataConf = MISSING
    model: QwenModelConf = MISSING
    loss: FocalLossConf = MISSING

    def output_names(self) -> list[str]:
        return list(self.data.labels)


@dataclass
class TextRegressionConf(RunConf):
    data: ArticlesDataConf = MISSING
    model: QwenModelConf = MISSING
    loss: LossConf = MISSING

    def output_names(self) -> list[str]:
        return list(self.data.dimension_names or [])


@dataclass
class TabularRegressionConf(RunConf):
    data: TabularDataConf = MISSING
    model: MLPModelConf = MISSING
    loss: LossConf = MISSING

    def output_names(self) -> list[str]:
        return list(self.data.target_names)


# The shipped tasks' roots by task name, only to say which task an option fits (``model=mlp`` fits
# tabular_regression); a task's class names its own root (``Task.conf``).
SHIPPED: dict[str, type[RunConf]] = {
    "classification": ClassificationConf,
    "text_regression": TextRegressionConf,
    "tabular_regression": TabularRegressionConf,
}
TASK_GROUPS = ("data", "model", "loss")  # the groups whose schema depends on the task
