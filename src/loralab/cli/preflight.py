"""``loralab-preflight model=qwen2_5_7b hardware=rtx3050 [lora=none ...]``: will this training config fit?"""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, open_dict
from omegaconf.errors import OmegaConfBaseException

from loralab.cli.args import fail, help_text, setup_logging, wants_help
from loralab.errors import ConfigError
from loralab.paths import conf_dir

PROG = "loralab-preflight"
DESCRIPTION = (
    "Compose the training config exactly as loralab-train would (same groups, same overrides) and "
    "estimate its peak training memory (weights, trainable state, activations, CUDA context) without "
    "loading or downloading any weights. Exit 0 when it fits hardware.memory_gib (or the device memory "
    "is unknown), 1 with one line naming what to cut when it clearly does not, 2 for a bad override."
)
GROUPS = {  # the config groups that decide the estimate, with what each contributes
    "model": "architecture whose parameters are counted (max_length sets activations)",
    "lora": "LoRA rank and targets; none trains every weight (optimizer state for all)",
    "hardware": "device memory, precision, micro-batch, gradient checkpointing, 4-bit",
    "experiment": "a named full setup, as for loralab-train",
}


def compose_train(overrides: Sequence[str], hydra_config: bool = False) -> DictConfig:
    """``train.yaml`` with ``overrides``, as ``loralab-train`` composes it (Hydra's compose API, no run dir)."""
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra_config)


def option_rows() -> list[tuple[str, str, str, str]]:
    """One row per group (choices read from the shipped configs, default from the defaults list)."""
    choices = compose_train([], hydra_config=True).hydra.runtime.choices
    rows = []
    for group, what in GROUPS.items():
        names = "|".join(sorted(p.stem for p in (conf_dir() / group).glob("*.yaml")))
        rows.append((group, "group", str(choices.get(group)).replace("None", "null"), f"{what}: {names}"))
    example = "model.max_length=512 optim.batch_size=32 hardware.micro_batch_size=2 hardware.load_in_4bit=true"
    rows.append(("KEY", "any", "-", f"any other train-config key, e.g. {example}"))
    return rows


def check(cfg: DictConfig) -> str:
    """The verdict line for a composed config; ConfigError for a bad value or a misfit. Every key is typed and
    checked by its schema, but the cross-field rules are not applied (they also ask for data files and a CUDA
    device on this machine): the question here is the memory only."""
    from loralab.config import typed
    from loralab.config.check import check_fields
    from loralab.config.hardware import auto_values
    from loralab.config.tasks import QwenModelConf
    from loralab.models.memory import check_memory, run_label

    with open_dict(cfg):
        cfg.hardware.update(auto_values(cfg.hardware))
        cfg.paths.output_dir = "."  # ${hydra:runtime.output_dir} exists inside a Hydra run only; nothing is written
    conf = typed(check_fields(cfg))
    if not isinstance(conf.model, QwenModelConf):
        return "nothing to check: this model is not a transformer (no model.pretrained)"
    hw = conf.hardware
    est = check_memory(
        conf.model, conf.lora, hw, num_labels=len(conf.output_names()), batch_size=conf.optim.batch_size, mode="error"
    )
    label = run_label(conf.model.name, conf.lora, hw.name)
    if hw.memory_gib is None:
        return f"{label}: {est.describe()}; device memory unknown (set hardware.memory_gib to compare)"
    return f"fits: {label}: {est.describe()} <= {hw.memory_gib:.1f} GiB"


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if wants_help(argv):
        print(help_text(PROG, DESCRIPTION, option_rows(), "[group=option ...] [key=value ...]"))
        return 0
    setup_logging(logging.WARNING)  # the estimate's own INFO line would repeat the verdict printed below
    try:
        cfg = compose_train(argv)
    except (HydraException, OmegaConfBaseException) as err:
        return fail(PROG, err)
    try:
        print(check(cfg))
    except ConfigError as err:
        return fail(PROG, err, status=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
