"""Closed choices of the configs (``precision: fp32 | bf16 | fp16 | auto``...): ``Choice`` enums, which compare,
hash, format, print and JSON-encode as their string value, so a typed config reads as its YAML."""

from __future__ import annotations

from enum import StrEnum


class Choice(StrEnum):
    """A closed choice that reads as its value everywhere (``repr`` included: config trees, error lines)."""

    def __repr__(self) -> str:
        return repr(self.value)


class Precision(Choice):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"
    auto = "auto"


class Preflight(Choice):
    error = "error"
    warn = "warn"
    off = "off"


class Leakage(Choice):
    warn = "warn"
    drop = "drop"
    error = "error"


class Split(Choice):
    random = "random"
    time = "time"
    walk_forward = "walk_forward"


class MonitorMode(Choice):
    max = "max"
    min = "min"


class CalibrationMethod(Choice):
    temperature = "temperature"
    none = "none"


class BaselineName(Choice):
    hgb = "hgb"
    logreg = "logreg"


class EnsembleMethod(Choice):
    blend = "blend"


class DecisionMethod(Choice):
    precision = "precision"


class EnsembleSelect(Choice):
    macro_f1 = "macro_f1"
    log_loss = "log_loss"


class TruncationSide(Choice):
    left = "left"
    right = "right"


class Backend(Choice):
    auto = "auto"
    nccl = "nccl"
    gloo = "gloo"


class DataFormat(Choice):
    auto = "auto"
    jsonl = "jsonl"
    csv = "csv"
    parquet = "parquet"


class PretrainName(Choice):
    none = "none"
    clm = "clm"


class PretrainTrain(Choice):
    full = "full"
    lora = "lora"


class BinCuts(Choice):
    quantile = "quantile"
    tree = "tree"
