"""Range rules, declared next to the schema field they guard (``knob(gt(0))``) and checked by one walker.

A rule sees the field's plain value (lists and dicts as Python containers, interpolations resolved) and carries
the text the error shows, so every message reads ``key=value: rule``.
"""

from __future__ import annotations

import dataclasses
import re
import string
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from omegaconf import MISSING

from loralab.data.serialize import is_number  # one definition: a bool is not a number
from loralab.data.timeorder import is_duration, valid_pattern


@dataclass(frozen=True)
class Rule:
    test: Callable[[Any], bool]
    text: str

    def holds(self, value: Any) -> bool:
        try:
            return bool(self.test(value))
        except (TypeError, ValueError):  # a value of the wrong shape breaks the rule rather than the check
            return False


def knob(*rules: Rule, each: Rule | None = None) -> Any:
    """A schema field with its rules in the metadata; ``each`` applies to every item of a dict or list field.
    No default (MISSING): values live in the YAML, types and rules here."""
    return dataclasses.field(default=MISSING, metadata={"rules": rules, "each": each})


def rules_of(f: dataclasses.Field) -> tuple[tuple[Rule, ...], Rule | None]:
    return f.metadata.get("rules", ()), f.metadata.get("each")


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def gt(lo: float) -> Rule:
    return Rule(lambda v: v > lo, f"must be > {lo}")


def ge(lo: float) -> Rule:
    return Rule(lambda v: v >= lo, f"must be >= {lo}")


def interval(spec: str) -> Rule:
    """``interval("[0, 1)")``: the text is the interval, brackets say whether an end is included."""
    m = re.fullmatch(r"([\[(])\s*(\S+),\s*(\S+)\s*([\])])", spec)
    if not m:
        raise ValueError(f"bad interval {spec!r}")
    lo_closed, lo, hi, hi_closed = m.group(1) == "[", float(m.group(2)), float(m.group(3)), m.group(4) == "]"

    def test(v: float) -> bool:
        return (lo <= v if lo_closed else lo < v) and (v <= hi if hi_closed else v < hi)

    return Rule(test, f"must be in {spec}")


def template_of(*fields: str) -> Rule:
    """A ``str.format`` template that uses at least one of ``fields`` and nothing else (``{oops}`` would be a
    KeyError on the first record, after the run started)."""

    def holds(v: str) -> bool:
        try:
            used = {name for _, name, _, _ in string.Formatter().parse(v) if name is not None}
        except ValueError:  # unbalanced braces
            return False
        return bool(used & set(fields)) and used <= set(fields)

    return Rule(holds, "must contain " + " and/or ".join(f"{{{f}}}" for f in fields) + " and no other {field}")


def one_of(*choices: str) -> Rule:
    return Rule(lambda v: v in choices, "must be " + _either(choices))


def auto_or(other: Callable[[Any], bool], what: str) -> Rule:
    """For the ``auto`` knobs of a hardware profile (resolved by ``loralab.config.resolve_hardware``)."""
    return Rule(lambda v: v == "auto" or other(v), f"must be auto, {what}")


def _either(choices: Iterable[str]) -> str:
    choices = list(choices)
    return ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else choices[0]


NAMES = Rule(
    lambda v: len(v) > 0 and all(isinstance(x, str) and x for x in v) and len(set(v)) == len(v),
    "must be a non-empty list of unique, non-empty strings",
)
# An output name is part of metric names (val_precision_<label>, class_count.train.<label>): MLflow takes letters,
# digits, _ - . : / and spaces, up to 250 characters in all. A name it refuses would fail the run after the data loads.
METRIC_NAME_PART = Rule(
    lambda v: isinstance(v, str) and len(v) <= 200 and re.fullmatch(r"[A-Za-z0-9_\-. :/]+", v) is not None,
    "must be at most 200 of: letters, digits, _ - . : / and spaces (it is part of MLflow metric names)",
)
NOT_EMPTY = Rule(lambda v: len(v) > 0, "must not be empty")
# MLflow's alias names: letters, digits, _ and -; "latest" and v<N> are its own (models:/name/latest, version N).
MODEL_ALIAS = Rule(
    lambda v: re.fullmatch(r"[\w\-]+", v) is not None and v.lower() != "latest" and not re.fullmatch(r"[vV]\d+", v),
    "must be letters, digits, _ and - (not latest or v<N>: MLflow reserves them)",
)
LORA_TARGETS = Rule(
    lambda v: (
        v is None
        or v == "all-linear"
        or (isinstance(v, list) and len(v) > 0 and all(isinstance(x, str) and x for x in v))
    ),
    "must be null (peft's default for the architecture), all-linear or a non-empty list of module names",
)
DEVICE = Rule(lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None, "must be auto, cpu, cuda or cuda:<index>")
CLASS_WEIGHTS = Rule(
    lambda v: (
        v in ("auto", "sqrt_inverse", "none", None) or (isinstance(v, list) and all(is_number(w) and w >= 0 for w in v))
    ),
    "must be auto, sqrt_inverse, none or a list of numbers >= 0",
)
OVERSAMPLE_TO = Rule(
    lambda v: v is None or v == "balanced" or (is_number(v) and 0 < v < 1),
    "must be a share in (0, 1), balanced or null",
)
RESUME_ALLOW = Rule(
    lambda v: isinstance(v, bool) or (isinstance(v, list) and all(isinstance(k, str) and k for k in v)),
    "must be true, false or a list of keys (e.g. [optim.lr, data.train_file])",
)
DURATION = Rule(
    is_duration, "must be a number >= 0 (records, the time feature's units, or days) or a duration such as 4h, 2d"
)
REGEX = Rule(valid_pattern, "must be a regular expression with at most one group (the time's text)")
STRPTIME = Rule(lambda v: "%" in v, "must be a strptime format such as %Y%m%d (with % directives)")
T_BOUNDS = Rule(lambda v: len(v) == 2 and 0 < v[0] < 1 < v[1], "must be [lo, hi] with 0 < lo < 1 < hi")
ZIP_PARTS = ("merged", "adapter", "base", "baseline", "loralab.json")
ZIP_PARTS_KNOWN = Rule(
    lambda v: v == "auto" or (isinstance(v, list) and set(v) <= set(ZIP_PARTS)),
    f"allowed parts: auto, or a list of {', '.join(ZIP_PARTS)}",
)
ZIP_PARTS_LOADABLE = Rule(
    lambda v: v == "auto" or ("loralab.json" in v and bool({"merged", "adapter"} & set(v))),
    "needs loralab.json and merged or adapter (or the zip cannot be loaded)",
)


def _gate(v: Any) -> bool:
    from loralab.metrics import is_rule

    return is_rule(v)


GATE = Rule(_gate, "must be '<op> <number>' with op in >=, >, <=, <")


def _scheduler(v: str) -> bool:
    from transformers import SchedulerType

    # reduce_lr_on_plateau steps on a metric, not once per optimizer step as the loop steps every schedule
    return v in {s.value for s in SchedulerType} - {"reduce_lr_on_plateau"}


SCHEDULER = Rule(
    _scheduler,
    "must be a transformers.get_scheduler name stepped per optimizer step (linear, cosine, constant_with_warmup, ...)",
)
