"""``check``: the composed config merged onto its task's schema, every field rule and every cross-field rule.

OmegaConf does the typing (wrong type, unknown key, enum typo); its multi-line errors become one line here, so a
typo in a sweep costs seconds and reads ``key=value: rule``, not a traceback.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from enum import Enum
from typing import Any, cast

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    InterpolationResolutionError,
    InterpolationValidationError,
    OmegaConfBaseException,
)

from loralab.config.cross import RULES, fail, require
from loralab.config.rules import rules_of
from loralab.config.schema import RunConf
from loralab.config.tasks import SHIPPED, TASK_GROUPS
from loralab.errors import ConfigError

HYDRA_KEYS = ("hydra",)  # Hydra's own node (compose(return_hydra_config=True)); never part of the run's config
SKIP = object()  # a value only the Hydra app can resolve (${hydra:...} outside it)


def check(cfg: DictConfig) -> DictConfig:
    """The run's config, typed by its task's schema and checked; raises ``ConfigError`` (one line) on the first
    broken rule. Call it right after composition, before anything loads. Interpolations stay unresolved (they
    resolve as usual later, ``${hydra:...}`` inside the Hydra app); closed choices come back as
    ``choices.Choice`` enums, which read as their string values."""
    typed = check_fields(cfg)
    task = task_class(typed)
    for rule in RULES:
        rule(typed, task)
    task.check(typed)
    return typed


def check_fields(cfg: DictConfig) -> DictConfig:
    """``check`` without the cross-field rules (which also ask for data files and the device on this machine):
    every key typed by the task's schema and within its field rules. For tools that read a config meant for
    another machine (``loralab-preflight``)."""
    body = OmegaConf.masked_copy(cfg, [str(k) for k in cfg.keys() if k not in HYDRA_KEYS])
    task = task_class(body)
    root = task.schema
    fit_groups(body, task.name, root)
    try:
        typed = cast(DictConfig, OmegaConf.merge(by_target(root, body), body))
        walk(typed, root, "")
    except OmegaConfBaseException as err:
        raise one_line(err, root, body) from None
    require(
        typed.task.name == task.name,
        "task.name",
        typed.task.name,
        f"must be {task.name}, the name of {typed.task._target_}",
    )
    OmegaConf.set_struct(typed, True)
    return typed


def task_class(cfg: DictConfig) -> Any:
    """The task class ``task._target_`` names (a ``loralab.tasks.base.Task``; its module is imported here). It owns
    the run's root schema (``schema``), its metric names and its own cross-field rules (``check``)."""
    from hydra.utils import get_class

    target = OmegaConf.select(cfg, "task._target_", default=None)
    try:
        task = get_class(str(target))
    except Exception as err:  # hydra wraps the import error; its first line says what is missing
        fail("task._target_", target, f"cannot import the task class: {str(err).splitlines()[0]}")
    schema = getattr(task, "schema", None)
    require(
        isinstance(schema, type) and issubclass(schema, RunConf),
        "task._target_",
        target,
        "must name a loralab.tasks.base.Task subclass (with its root schema as schema)",
    )
    return task


def typed(cfg: DictConfig) -> RunConf:
    """The checked config (``check``'s result, ``auto`` values resolved) as instances of its task's root schema,
    interpolations resolved: the object a run reads (``conf.trainer.max_epochs``). A value that does not resolve
    here (an unset environment variable, ``${hydra:...}`` outside the Hydra app) fails as one line."""
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]  # a structured root gives its dataclass
    except OmegaConfBaseException as err:
        raise one_line(err, task_class(cfg).schema, cfg) from None


def by_target(root: type, body: DictConfig) -> DictConfig:
    """The root schema, with each group whose options differ in keys (``serialize=json|kv|bins``: a schema with a
    ``BY_TARGET`` map) set to the schema of the option's ``_target_``."""
    typed = OmegaConf.structured(root)
    for name, tp in hints(root).items():
        options = getattr(unwrap(tp)[0], "BY_TARGET", None)
        node = body.get(name)
        if options is None or not OmegaConf.is_dict(node):
            continue
        target = node.get("_target_")
        require(target in options, f"{name}._target_", target, f"must be one of {', '.join(options)}")
        typed[name] = OmegaConf.structured(options[target])
    return typed


def fit_groups(body: DictConfig, task: str, root: type) -> None:
    """``model=mlp`` in a classification run: say it does not fit the task, not which of its keys are unknown."""
    for group in TASK_GROUPS:
        node = body.get(group)
        if not OmegaConf.is_dict(node) or fits(node, hints(root)[group]):
            continue
        others = {t: hints(other)[group] for t, other in SHIPPED.items() if t != task}
        others = {t: schema for t, schema in others.items() if fits(node, schema)}
        if others:
            option = choice(group) or next(iter(others.values())).OPTION
            fail(group, option, f"does not fit task {task} (it fits {', '.join(others)})")


def fits(node: DictConfig, schema: type) -> bool:
    """Merges onto ``schema`` and leaves no value unset that the option itself had set."""
    try:
        merged = cast(DictConfig, OmegaConf.merge(OmegaConf.structured(schema), node))
    except OmegaConfBaseException:
        return False
    return missing(merged) <= missing(node)


def missing(node: DictConfig) -> set[str]:
    return {str(k) for k in node.keys() if OmegaConf.is_missing(node, k)}


def choice(group: str) -> str | None:
    """The option picked for ``group`` (``model=mlp``), known inside the Hydra app only."""
    return HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None


def walk(node: DictConfig, schema: Any, prefix: str) -> None:
    """Every field of ``schema`` in ``node``: set, resolvable to its type, and within its rules."""
    types = hints(schema)
    for f in dataclasses.fields(schema):
        key = prefix + f.name
        if OmegaConf.is_missing(node, f.name):
            fail(key, "???", "missing value: set it (on the command line: " + key + "=...)")
        tp, optional = unwrap(types[f.name])
        if dataclasses.is_dataclass(tp):
            if node[f.name] is not None:  # the option's own schema where by_target picked a subclass
                walk(node[f.name], OmegaConf.get_type(node[f.name]) or tp, key + ".")
            continue
        value = plain(node, f.name)
        if value is SKIP or (value is None and optional):
            continue
        # No knob means inf or NaN (optim.lr=inf would pass "> 0", then train NaN for an epoch).
        require(not isinstance(value, float) or math.isfinite(value), key, value, "must be a finite number")
        rules, each = rules_of(f)
        for rule in rules:
            require(rule.holds(value), key, value, rule.text + (" or null" if optional else ""))
        if each is not None:
            for sub, item in value.items() if isinstance(value, dict) else enumerate(value):
                require(item is SKIP or each.holds(item), f"{key}.{sub}", item, each.text)


def plain(parent: Any, key: Any) -> Any:
    """``parent[key]`` resolved, as Python values (typed by OmegaConf on the way), or ``SKIP``."""
    try:
        value = parent[key]
    except InterpolationResolutionError as err:
        if not HydraConfig.initialized() and ("HydraConfig was not set" in str(err) or "type hydra" in str(err)):
            return SKIP
        raise
    if OmegaConf.is_dict(value):
        return {k: plain(value, k) for k in value.keys()}
    if OmegaConf.is_list(value):
        return [plain(value, i) for i in range(len(value))]
    return value


def one_line(err: OmegaConfBaseException, root: type, body: DictConfig) -> ConfigError:
    """OmegaConf's error (message, full_key, object_type on separate lines) as ``key=value: rule``."""
    key = getattr(err, "full_key", None) or ""
    parts = re.findall(r"[^.\[\]]+", key)
    value = raw(body, parts)
    if isinstance(err, ConfigKeyError):
        parent, _ = unwrap(type_at(root, parts[:-1]))
        known = (
            [f.name for f in dataclasses.fields(parent) if not f.name.startswith("_")]
            if dataclasses.is_dataclass(parent)
            else []
        )
        return ConfigError(f"{key}={value!r}: unknown key (known: {', '.join(known)})")
    want = expected(*unwrap(type_at(root, parts)))
    if isinstance(err, InterpolationValidationError):
        return ConfigError(f"{key}={value!r}: resolves to {getattr(err, 'value', None)!r}, {want}")
    if isinstance(err, InterpolationResolutionError):
        return ConfigError(f"{key}={value!r}: cannot be resolved: {str(err.msg).splitlines()[0]}")
    if value is SKIP:  # not in the composed config (a list item OmegaConf was converting): its value
        value = getattr(err, "value", None)
    return ConfigError(f"{key}={value!r}: {want}")


def raw(cfg: DictConfig, parts: list[str]) -> Any:
    """The composed value at ``parts``, interpolations as written; ``SKIP`` where there is none."""
    node: Any = OmegaConf.to_container(cfg)
    for part in parts:
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError, TypeError):
            return SKIP
    return node


def hints(schema: Any) -> dict[str, Any]:
    return typing.get_type_hints(schema)


def unwrap(tp: Any) -> tuple[Any, bool]:
    """``Optional[X]`` -> (X, True); anything else -> (it, False)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


def type_at(root: type, parts: list[str]) -> Any:
    """The schema type at a key path (dataclass fields, dict values, list items); ``Any`` past the schema."""
    tp: Any = root
    for part in parts:
        tp, _ = unwrap(tp)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            tp = hints(tp).get(part, Any)
        elif origin in (dict, list) and args:
            tp = args[-1]
        else:
            return Any
    return tp


def expected(tp: Any, optional: bool) -> str:
    """What a value of schema type ``tp`` must be, in the words of the YAML."""
    names = {bool: "true or false", int: "an int", float: "a float", str: "a string"}
    if tp in names:
        text = names[tp]
    elif isinstance(tp, type) and issubclass(tp, Enum):
        text = "one of " + ", ".join(e.value for e in tp)
    elif typing.get_origin(tp) is list:
        text = "a list"
    elif typing.get_origin(tp) is dict or dataclasses.is_dataclass(tp):
        text = "a mapping of keys to values"
    else:
        text = "a valid value"
    return f"must be {text}" + (" or null" if optional else "")
