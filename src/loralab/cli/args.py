"""``key=value`` command lines for loralab's tools, in the style of ``loralab-train`` (Hydra's override syntax).

A tool's options are a dataclass: OmegaConf merges the arguments into it, so types are checked and converted the
same way as in the training config (not Hydra itself, whose ``model=`` would select the ``conf/model`` group). The
help text comes from the dataclass too: each field's type, its default (or "required") and ``metadata["help"]``.
Every failure is one line naming the key and the problem, and exit status 2.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from loralab.errors import ConfigError, DataError, ExportError

HELP_FLAGS = ("-h", "--help")
RUN_ERRORS = (ConfigError, DataError, ExportError)  # a tool reports these in one line, exit 2, no traceback


class UsageError(ValueError):
    """A bad command line; the message is one line naming the key."""


def option(default: Any = MISSING, help: str = "") -> Any:
    """A dataclass field with its one-line help (``default`` MISSING = a required option)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Tool:
    """A command: what --help says about it and the dataclass its arguments fill."""

    prog: str  # the console script, e.g. loralab-predict
    description: str  # one paragraph for --help
    schema: type  # the options dataclass
    positional: str | None = None  # a bare argument (no '=') is this option's value


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in typing.get_args(tp) if a is not type(None)]
        return "|".join(names) + ("|null" if type(None) in typing.get_args(tp) else "")
    return getattr(tp, "__name__", str(tp))


def _default(value: Any) -> str:
    """A default as it is typed on the command line."""
    if value is MISSING:
        return "required"
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def schema_rows(schema: type) -> list[tuple[str, str, str, str]]:
    """(name, type, default, help) per option of a dataclass, required ones first."""
    hints = typing.get_type_hints(schema)
    rows = [
        (f.name, _type_name(hints[f.name]), _default(f.default), f.metadata.get("help", ""))
        for f in dataclasses.fields(schema)
    ]
    return sorted(rows, key=lambda row: row[2] != "required")


def help_text(prog: str, description: str, rows: Sequence[tuple[str, str, str, str]], usage: str) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"usage: {prog} {usage}", "", textwrap.fill(description, 100), "", "options (key=value):"]
    lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3] for row in rows]
    return "\n".join([*lines, f"  {'-h, --help'.ljust(sum(widths) + 4)}  show this help and exit"])


def usage_line(tool: Tool) -> str:
    parts = [f"{n}=<{t}>" if d == "required" else f"[{n}=<{t}>]" for n, t, d, _ in schema_rows(tool.schema)]
    return " ".join(parts)


def parse(tool: Tool, argv: Sequence[str]) -> Any:
    """The options dataclass filled from ``argv``; UsageError (one line) for an unknown key, a bad value or a
    missing required option."""
    names = [f.name for f in dataclasses.fields(tool.schema)]
    pairs: list[str] = []
    for arg in argv:
        if "=" not in arg:
            if tool.positional is None or any(p.startswith(f"{tool.positional}=") for p in pairs):
                raise UsageError(f"{arg!r}: expected key=value (see {tool.prog} --help)")
            arg = f"{tool.positional}={arg}"
        key = arg.split("=", 1)[0]
        if key not in names:
            raise UsageError(f"{key}: unknown option (options: {', '.join(names)})")
        pairs.append(arg)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(tool.schema), *map(_dotted, pairs))
    except OmegaConfBaseException as err:
        raise UsageError(_one_line(err)) from None
    missing = [n for n in names if n in OmegaConf.missing_keys(cfg)]
    if missing:
        raise UsageError(f"missing {', '.join(f'{k}=...' for k in missing)} (required; see {tool.prog} --help)")
    try:
        return OmegaConf.to_object(cfg)
    except (OmegaConfBaseException, TypeError, ValueError) as err:  # a dataclass's own __post_init__ check
        raise UsageError(_one_line(err)) from None


def _dotted(pair: str) -> Any:
    """One ``key=value`` as OmegaConf reads it (YAML typing: ``3`` an int, ``null`` None); a value YAML refuses
    (``time_format=%Y%m%d``: ``%`` starts a YAML directive) is the text as typed."""
    try:
        return OmegaConf.from_dotlist([pair])
    except yaml.YAMLError:
        key, value = pair.split("=", 1)
        return OmegaConf.create({key: value})


def _one_line(err: Exception) -> str:
    """OmegaConf's multi-line messages as ``key: problem``."""
    first = str(getattr(err, "msg", err)).splitlines()[0]
    key = getattr(err, "full_key", None)
    return f"{key}: {first}" if key else first


def fail(prog: str, message: Any, status: int = 2) -> int:
    """Print one line on stderr and return the exit status."""
    print(f"{prog}: error: {(str(message).splitlines() or [''])[0]}", file=sys.stderr)
    return status


def wants_help(argv: Sequence[str]) -> bool:
    return any(arg in HELP_FLAGS for arg in argv)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def run(
    tool: Tool,
    fn: Callable[[Any], int | None],
    argv: Sequence[str] | None = None,
    errors: tuple[type[BaseException], ...] = RUN_ERRORS,
) -> int:
    """A tool's main: --help, parse, run ``fn(options)``; returns the exit status (``fn``'s, or 0, or 2)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if wants_help(argv):
        print(help_text(tool.prog, tool.description, schema_rows(tool.schema), usage_line(tool)))
        return 0
    try:
        options = parse(tool, argv)
    except UsageError as err:
        return fail(tool.prog, err)
    setup_logging()
    try:
        return fn(options) or 0
    except errors as err:
        return fail(tool.prog, f"{type(err).__name__}: {err}")
