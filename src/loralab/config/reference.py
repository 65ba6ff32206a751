"""The configuration reference: every option of every config group, its keys, values and comments, as Markdown.

It is built from the YAML files themselves, so it cannot drift from them; ``docs/configuration.md`` is its output
and ``tests/test_config_reference.py`` fails when the two differ. Regenerate with

    python -m loralab.config.reference > docs/configuration.md

How a file is read, deliberately without Hydra (no composition, no interpolation): ``yaml.safe_load`` gives the keys
and the values' structure; a line scan gives what YAML drops, the value as written and the comments. A key's
comment is its trailing ``# ...`` plus the comment-only lines right below it that start in the same column (the
files wrap long comments that way), or, with no trailing comment, the comment-only lines right above it. The
comment block that opens a file describes the option. Keys starting with ``_`` (``_target_``, ``_convert_``, ...)
are wiring, not settings, and are left out; ``defaults`` (Hydra's list of configs an option builds on) is shown as
one line. The ``hydra`` group (run dirs, launchers) is Hydra's own and is left out too.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]  # PyYAML, a Hydra dependency, ships no type hints

from loralab.paths import conf_dir

SKIPPED_GROUPS = {"hydra"}
COMMAND = "python -m loralab.config.reference > docs/configuration.md"

# `key: rest` on one line; list items (`- ...`) and comment lines do not match. Keys may hold dots (`loss.gamma`).
_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[^\s#:'\"-][^:#]*?):(?:\s+(?P<rest>.*))?$")


@dataclass(frozen=True)
class Line:
    """What the line scan knows about one key: its value as written (may be empty) and its comment."""

    value: str
    comment: str


def comment_start(text: str) -> int:
    """Where the comment in ``text`` starts (-1: none): a ``#`` after whitespace, outside quotes."""
    quote = ""
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or text[i - 1].isspace()):
            return i
    return -1


def comment_text(line: str) -> str:
    """``'  # peak lr'`` -> ``'peak lr'``."""
    return line.strip().removeprefix("#").strip()


def scan_lines(text: str) -> tuple[str, dict[str, Line]]:
    """The file's opening comment (its description) and, per dotted key path, the value as written and comment."""
    lines = text.splitlines()
    opening = 0  # the opening comment block's length
    while opening < len(lines) and lines[opening].startswith("#"):
        opening += 1
    header = [comment_text(raw) for raw in lines[:opening] if not raw.startswith("# @package")]  # a directive
    found: dict[str, Line] = {}
    parents: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    above: list[str] = []  # comment-only lines since the last key, after the header
    taken: set[int] = set()  # lines already read as the wrapped part of a trailing comment
    for n, raw in enumerate(lines[opening:], start=opening):
        if n in taken:
            continue
        if raw.strip().startswith("#"):
            above.append(comment_text(raw))
            continue
        match = _KEY_LINE.match(raw)
        if not match:
            above = []
            continue
        indent = len(match["indent"])
        while parents and parents[-1][0] >= indent:
            parents.pop()
        path = ".".join([key for _, key in parents] + [match["key"].strip()])
        parents.append((indent, match["key"].strip()))
        rest = match["rest"] or ""
        start = comment_start(rest)
        if start >= 0:  # a trailing comment, perhaps wrapped onto the lines below
            more = wrapped(lines, n, len(raw) - len(rest) + start)
            taken.update(range(n + 1, n + 1 + len(more)))
            value, comment = rest[:start].strip(), " ".join([comment_text(rest[start:]), *more])
        else:  # no trailing comment: the comment lines right above the key, if any
            value, comment = rest.strip(), " ".join(above)
        found[path] = Line(value, comment)
        above = []
    return "\n".join(header), found


def wrapped(lines: list[str], n: int, column: int) -> list[str]:
    """Comment-only lines after line ``n`` whose ``#`` sits in ``column``: the wrapped rest of its comment."""
    rest = []
    for raw in lines[n + 1 :]:
        if not (raw.strip().startswith("#") and raw.index("#") == column):
            break
        rest.append(comment_text(raw))
    return rest


def leaf_paths(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every user-facing key of a loaded YAML mapping, dotted, with its loaded value (mappings too, then children)."""
    out: list[tuple[str, Any]] = []
    if not isinstance(node, dict):
        return out
    for key, value in node.items():
        key = str(key)
        if key.startswith("_") or (not prefix and key == "defaults"):
            continue
        path = f"{prefix}{key}"
        out.append((path, value))
        out.extend(leaf_paths(value, f"{path}."))
    return out


def package_prefix(text: str, group: str) -> str:
    """Where an option's keys land: ``<group>.`` unless the file says ``# @package _global_`` (or another package);
    ``train.yaml`` (group ``""``) is the root."""
    match = re.search(r"^# @package (\S+)", text, re.MULTILINE)
    package = match[1] if match else group
    return "" if package in ("_global_", "") else f"{package}."


def flow(value: Any) -> str:
    """A loaded value on one line, YAML flow style: ``[train]``, ``override /lora: none``, ``default``."""
    if isinstance(value, dict) and len(value) == 1:  # a defaults-list entry
        ((key, item),) = value.items()
        return f"{key}: {flow(item)}"
    return str(yaml.safe_dump(value, default_flow_style=True)).removesuffix("\n").removesuffix("\n...").strip()


def cell(text: str) -> str:
    """Table-safe text: a ``|`` would end the cell."""
    return text.replace("|", "\\|")


def option_section(path: Path, group: str, default: str | None) -> list[str]:
    """One option's Markdown: heading, description, defaults list and a table of its keys."""
    text = path.read_text(encoding="utf-8")
    loaded = yaml.safe_load(text) or {}
    description, scanned = scan_lines(text)
    title = f"### `{group}={path.stem}`" + (" (default)" if path.stem == default else "")
    out = [title, ""]
    if description:
        out += [description, ""]
    if group and isinstance(loaded, dict) and loaded.get("defaults"):  # train.yaml's: the per-group defaults
        entries = ", ".join(f"`{flow(entry)}`" for entry in loaded["defaults"])
        out += [f"Builds on (Hydra defaults list): {entries}", ""]
    keys = leaf_paths(loaded)
    if not keys:
        return out
    prefix = package_prefix(text, group)
    out += ["| key | value | comment |", "|---|---|---|"]
    for key, value in keys:
        line = scanned.get(key, Line("", ""))
        written = "" if isinstance(value, dict) else line.value
        if not written and not isinstance(value, dict):  # e.g. a block list: show what YAML read, in flow style
            written = flow(value)
        shown = f"`{cell(written)}`" if written else ""
        out.append(f"| `{prefix}{key}` | {shown} | {cell(line.comment)} |")
    return out + [""]


def default_options(conf: Path) -> dict[str, str]:
    """The option ``train.yaml``'s defaults list picks per group (``{"model": "tiny_qwen2", ...}``)."""
    loaded = yaml.safe_load((conf / "train.yaml").read_text(encoding="utf-8"))
    picks = [e for e in loaded.get("defaults", []) if isinstance(e, dict)]
    return {str(k): str(v) for pick in picks for k, v in pick.items()}


def build_reference(conf: Path | None = None) -> str:
    """The whole reference for the configs in ``conf`` (default: the packaged ``conf/``) as one Markdown page."""
    conf = conf or conf_dir()
    defaults = default_options(conf)
    groups = sorted(p for p in conf.iterdir() if p.is_dir() and p.name not in SKIPPED_GROUPS)
    out = [
        "# Configuration reference",
        "",
        f"Generated from `conf/` by `{COMMAND}`; do not edit by hand.",
        "",
        "Pick an option per group with `group=option` and set any key with `key=value`, e.g.",
        "`python train.py model=qwen2_5_0_5b lora.r=16`. Values are shown as written in the YAML (`???`: required,",
        "`null`: off or unset, `${...}`: filled from another key or an environment variable when the run starts).",
        "",
        "## Run-level keys (`conf/train.yaml`)",
        "",
    ]
    out += option_section(conf / "train.yaml", "", None)[2:]  # no heading: the section above names it
    for group in groups:
        options = sorted(group.glob("*.yaml"))
        names = ", ".join(f"`{p.stem}`" for p in options)
        default = defaults.get(group.name)
        picked = f"Default: `{default}`." if default not in (None, "None") else "Default: none (pick one to use it)."
        out += [f"## {group.name}", "", f"Options: {names}. {picked}", ""]
        for path in options:
            out += option_section(path, group.name, default)
    return "\n".join(out).rstrip("\n") + "\n"


def main() -> None:
    """Print the reference for the packaged configs (redirect it to docs/configuration.md)."""
    sys.stdout.write(build_reference())


if __name__ == "__main__":
    main()
