"""Config composition (Hydra compose API) and ``config.validate``'s one-line errors."""

from __future__ import annotations

import pytest
import torch
from conftest import CONF_DIR, LABELS, compose_train
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from loralab.config import ConfigError, validate
from loralab.core.memory import resolve_auto

# Options that only make sense inside a regression experiment (conf/experiment/*.yaml sets task and them).
REGRESSION_ONLY = {("data", "articles"), ("data", "marketsentinel"), ("model", "mlp"), ("loss", "mse"),
                   ("loss", "head_mse")}
GROUP_OPTIONS = sorted((p.parent.name, p.stem) for p in CONF_DIR.glob("*/*.yaml") if p.parent.name != "hydra")


def test_every_group_has_been_found():
    groups = {g for g, _ in GROUP_OPTIONS}
    assert {"data", "lora", "model", "loss", "optim", "trainer", "hardware", "tracking", "export"} <= groups


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_option_composes_resolves_and_validates(group, option, tmp_path):
    train_file = tmp_path / "train.jsonl"
    train_file.touch()
    cfg = compose_train(f"{group}={option}", f"data.train_file={train_file}", hydra_config=True)
    assert OmegaConf.select(cfg, f"hydra.runtime.choices.{group}") == option
    # run.py logs the fully resolved config to MLflow: every interpolation must resolve (the compose API leaves
    # hydra.runtime.output_dir, which paths.output_dir reads, for @hydra.main to fill in).
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert resolved["paths"]["output_dir"] == str(tmp_path)
    if cfg.task != "classification" or (group, option) in REGRESSION_ONLY:
        return  # regression options are validated with their experiments (tests/test_regression_*.py)
    with open_dict(cfg):  # as run.train does: "auto" values become what torch sees
        cfg.hardware = resolve_auto(OmegaConf.to_container(cfg.hardware))
    if str(cfg.hardware.device).startswith("cuda") and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):  # GPU profiles refuse clearly on CPU
            validate(cfg)
        return
    validate(cfg)


USER_KEYS = {
    "data.train_file": "/data/t.jsonl", "data.val_file": "/data/v.jsonl", "data.labels": ["up", "down"],
    "lora.r": 4, "lora.lora_alpha": 32, "lora.lora_dropout": 0.1, "lora.target_modules": ["q_proj"],
    "loss.gamma": 2.5, "loss.class_weights": [1.0, 2.0], "optim.lr": 0.001, "optim.batch_size": 4,
    "trainer.max_epochs": 3, "trainer.early_stopping.patience": 5, "seed": 7,
    "tracking.uri": "sqlite:///x.db", "tracking.experiment": "exp",
}


def test_user_facing_keys_exist_and_override():
    def fmt(v):
        return "[" + ",".join(map(str, v)) + "]" if isinstance(v, list) else str(v)

    cfg = compose_train("lora=default", *(f"{k}={fmt(v)}" for k, v in USER_KEYS.items()))
    for key, value in USER_KEYS.items():
        got = OmegaConf.select(cfg, key)
        assert (OmegaConf.to_container(got) if OmegaConf.is_config(got) else got) == value, key


def test_default_labels():
    assert list(compose_train().data.labels) == LABELS


def test_tiny_model_defaults_to_full_fine_tuning():
    assert compose_train("model=tiny_qwen2").lora.enabled is False


@pytest.mark.parametrize("order", [("model=tiny_qwen2", "lora=default"), ("lora=default", "model=tiny_qwen2")])
def test_command_line_lora_wins_over_model_default(order):
    assert compose_train(*order).lora.r == 8


def test_real_model_gets_lora_rank_8():
    cfg = compose_train("model=qwen2_5_0_5b")
    assert cfg.lora.r == 8 and cfg.lora.enabled is True


def test_default_config_validates():
    validate(compose_train())


BAD_VALUES = [
    (["loss.gamma=-0.5"], "loss.gamma", "-0.5", ">= 0"),
    (["lora=default", "lora.r=0"], "lora.r", "0", "> 0"),
    (["lora=default", "lora.r=-4"], "lora.r", "-4", "> 0"),
    (["lora=default", "lora.lora_dropout=1.0"], "lora.lora_dropout", "1.0", "[0, 1)"),
    (["optim.lr=0"], "optim.lr", "0", "> 0"),
    (["trainer.early_stopping.patience=-1"], "trainer.early_stopping.patience", "-1", ">= 0"),
    (["data.labels=[]"], "data.labels", "[]", "non-empty"),
    (["data.labels=[long,short,long]"], "data.labels", "['long', 'short', 'long']", "unique"),
    (["data=jsonl", "data.train_file=/nonexistent/train.jsonl"], "data.train_file", "/nonexistent/train.jsonl",
     "not found"),
    (["optim.batch_size=10", "hardware.micro_batch_size=4"], "optim.batch_size", "10", "divisible"),
    (["trainer.monitor=val_f1"], "trainer.monitor", "val_f1", "val_macro_f1"),
    (["trainer.gates.val_accuracy=high"], "trainer.gates.val_accuracy", "high", "<op> <number>"),
]


@pytest.mark.parametrize(("overrides", "key", "value", "rule"), BAD_VALUES, ids=[" ".join(c[0]) for c in BAD_VALUES])
def test_validate_rejects_with_one_line(overrides, key, value, rule):
    with pytest.raises(ConfigError) as err:
        validate(compose_train(*overrides))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{key}=") and value in message and rule in message


@pytest.mark.parametrize("overrides, enabled", [
    (["loss.gamma=1.5", "lora.r=16"], True),        # the design card's sweep: python train.py -m ... lora.r=8,16,32
    (["lora=none"], False),
    (["lora=none", "lora.enabled=false", "lora.r=4"], False),  # explicit off wins
    (["model=qwen2_5_0_5b"], True),
])
def test_lora_keys_on_the_command_line_turn_lora_on(overrides, enabled):
    from omegaconf import open_dict

    from loralab.config import enable_lora_if_asked

    cfg = compose_train(*overrides)  # default model tiny_qwen2 trains fully unless asked
    with open_dict(cfg):
        enable_lora_if_asked(cfg, overrides)
    assert cfg.lora.enabled is enabled
    if enabled:
        assert cfg.lora.r == (16 if "lora.r=16" in overrides else 8)
