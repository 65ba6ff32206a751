"""What changed between the config a checkpoint was trained with and the one resuming it.

A resume continues the optimizer, schedule and data order of the saved run; a different learning rate or train
file would silently make a run that neither config describes (MLflow params are write-once and keep the old
values). So resume refuses any change unless ``resume_allow_changes`` names it, and logs what it accepted.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

# Keys that may differ on resume: they say how and where a run is driven and recorded, not what it computes
# (hardware.name is only the profile's label; the values it sets are compared one by one).
RESUME_IGNORED = (
    "resume",
    "resume_allow_changes",
    "quiet",
    "paths",
    "tracking",
    "hardware.name",
    "hardware.num_workers",
    "hardware.pin_memory",
    "hardware.torch_threads",
    "hardware.preflight",
    "hardware.memory_gib",
    "distributed.timeout_min",
    "data.cache_dir",
)
ABSENT = "<absent>"
# Keys added since checkpoints were first written, with the value a run saved before them behaved as: a config saved
# without the key resumes under that value as unchanged.
ADDED_KEYS = {"hardware.packing": False}


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict to ``a.b.c`` keys (MLflow params are flat)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def covers(patterns: Sequence[str], key: str) -> bool:
    """``optim`` covers ``optim.lr``; ``data.train_file`` covers ``data.train_file.sha256``."""
    return any(key == p or key.startswith(p + ".") for p in patterns)


def changed(
    saved: Mapping[str, Any], used: Mapping[str, Any], ignore: Sequence[str] = RESUME_IGNORED
) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved value, used value)}`` for every flat key that differs and is not ignored."""
    old, new = flatten(saved), flatten(used)
    old |= {k: v for k, v in ADDED_KEYS.items() if k in new and k not in old}
    return {
        k: (old.get(k, ABSENT), new.get(k, ABSENT))
        for k in sorted(old.keys() | new.keys())
        if old.get(k, ABSENT) != new.get(k, ABSENT) and not covers(ignore, k)
    }


def refused(changes: Mapping[str, Any], allow: bool | Sequence[str]) -> list[str]:
    """The changed keys ``resume_allow_changes`` does not accept (true: all, false: none, a list: those keys)."""
    if allow is True:
        return []
    return [k for k in changes if not (allow and covers(list(allow), k))]


def describe(changes: Mapping[str, tuple[Any, Any]], width: int = 60) -> str:
    """``optim.lr: 0.001 -> 0.01, ...`` on one line, each value cut to ``width`` characters."""

    def short(v: Any) -> str:
        text = v if v is ABSENT else repr(v)
        return text if len(text) <= width else text[: width - 3] + "..."

    return ", ".join(f"{k}: {short(a)} -> {short(b)}" for k, (a, b) in changes.items())
