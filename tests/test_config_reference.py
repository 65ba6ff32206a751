"""docs/configuration.md is generated from conf/ and must stay so: the committed page equals the generator's output,
it names every option and every user-facing key, and an option added to conf/ shows up without code changes."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from loralab.config.reference import COMMAND, build_reference

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PAGE = ROOT / "docs" / "configuration.md"


def user_keys(node: object, prefix: str = "") -> list[str]:
    """Dotted keys of a loaded YAML mapping, parsed here independently of the generator: `_`-keys and the top-level
    `defaults` list are Hydra wiring, not settings."""
    if not isinstance(node, dict):
        return []
    keys = []
    for key, value in node.items():
        if str(key).startswith("_") or (not prefix and key == "defaults"):
            continue
        keys.append(f"{prefix}{key}")
        keys.extend(user_keys(value, f"{prefix}{key}."))
    return keys


def test_committed_page_is_up_to_date():
    assert PAGE.read_text(encoding="utf-8") == build_reference(CONF), (
        f"docs/configuration.md is stale (an option or key of conf/ changed): regenerate it with `{COMMAND}`"
    )


def test_every_option_and_key_is_in_the_reference():
    text = build_reference(CONF)
    option_files = [p for p in CONF.glob("*/*.yaml") if p.parent.name != "hydra"]
    assert len(option_files) > 30  # the glob found the groups
    for path in option_files:
        group, option = path.parent.name, path.stem
        assert f"`{group}={option}`" in text, f"option {group}={option} missing"
        raw = path.read_text(encoding="utf-8")
        is_global = "# @package _global_" in raw
        for key in user_keys(yaml.safe_load(raw)):
            shown = key if is_global else f"{group}.{key}"
            assert f"| `{shown}` |" in text, f"{path.relative_to(ROOT)}: key {shown} missing"
    for key in user_keys(yaml.safe_load((CONF / "train.yaml").read_text(encoding="utf-8"))):
        assert f"| `{key}` |" in text, f"train.yaml: key {key} missing"


def test_a_new_option_appears_with_its_keys_values_and_comments(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "loss" / "huber.yaml").write_text(
        "# Huber loss: robust to outliers.\n"
        "_target_: torch.nn.HuberLoss\n"
        "delta: 1.0               # where squared turns linear\n"
        "schedule:\n"
        "  warm: 3                # epochs before the loss switches on; a long\n"
        "                         # comment wrapped onto the next line\n"
        "  # a comment above a key describes it\n"
        "  cool: [1, 2]\n",
        encoding="utf-8",
    )
    text = build_reference(conf)
    assert "### `loss=huber`" in text
    assert "Huber loss: robust to outliers." in text
    assert "| `loss.delta` | `1.0` | where squared turns linear |" in text
    assert "| `loss.schedule.warm` | `3` | epochs before the loss switches on; a long comment wrapped onto" in text
    assert "| `loss.schedule.cool` | `[1, 2]` | a comment above a key describes it |" in text
    assert "_target_" not in text.split("### `loss=huber`")[1].split("###")[0]  # wiring, not a setting
