"""Hardware profiles, batch geometry, memory preflight and the offline Qwen2.5 shapes."""

import logging
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from loralab.config import ConfigError, check, resolve_hardware
from loralab.core.sampler import accumulation_steps
from loralab.models.build import ModelSource, shipped_config, train_tokenizer
from loralab.models.memory import Workload, check_memory, estimate_memory

CONF = str(Path(__file__).resolve().parents[1] / "conf")
MODELS = ["tiny_qwen2", "qwen2_5_0_5b", "qwen2_5_1_5b", "qwen2_5_3b", "qwen2_5_7b"]
PROFILES = ["cpu", "rtx3050", "a100", "h100", "auto"]


def preflight(cfg):
    """The lifecycle's memory check on a composed config's model, lora and hardware groups."""
    return check_memory(
        cfg.model, cfg.lora, cfg.hardware, num_labels=len(cfg.data.labels), batch_size=cfg.optim.batch_size
    )


def compose_cfg(*overrides):
    with initialize_config_dir(CONF, version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("hardware", PROFILES)
def test_every_model_and_profile_composes(model, hardware, fake_cuda):
    cfg, _ = resolve_hardware(check(compose_cfg(f"model={model}", f"hardware={hardware}")))
    hw = OmegaConf.to_container(cfg.hardware)
    assert "auto" not in [v for k, v in hw.items() if k != "name"]
    assert hw["precision"] in ("fp32", "bf16", "fp16")
    assert cfg.model.name == model and cfg.model.max_length > 0 and cfg.model.truncation_side in ("left", "right")


def test_effective_batch_is_kept_across_profiles(fake_cuda):
    assert accumulation_steps(16, None) == 1
    assert accumulation_steps(16, 4) == 4
    assert accumulation_steps(16, 32) == 1  # a micro batch above the effective one is capped at it
    for profile in PROFILES:
        hw = resolve_hardware(check(compose_cfg(f"hardware={profile}", "optim.batch_size=32")))[0].hardware
        micro = hw.micro_batch_size or 32
        steps = accumulation_steps(32, micro)
        assert min(micro, 32) * steps == 32
    with pytest.raises(ConfigError, match=r"optim.batch_size=10.*micro_batch_size=4"):
        accumulation_steps(10, 4)


def test_preflight_refuses_7b_on_a_4gb_gpu_and_accepts_0_5b_lora(caplog):
    with pytest.raises(ConfigError) as err:
        preflight(compose_cfg("model=qwen2_5_7b", "hardware=rtx3050"))
    message = str(err.value)
    assert "\n" not in message and "hardware.preflight" in message and "> 4.0 GiB" in message
    with caplog.at_level(logging.WARNING, logger="loralab.models.memory"):
        preflight(compose_cfg("model=qwen2_5_0_5b", "hardware=rtx3050"))  # no error, no warning
        assert not caplog.records
        preflight(compose_cfg("model=qwen2_5_7b", "hardware=rtx3050", "hardware.preflight=warn"))  # warns only
    (warning,) = caplog.records
    assert warning.levelname == "WARNING" and "> 4.0 GiB" in warning.getMessage()


def test_memory_estimate_moves_the_right_way():
    arch = shipped_config("qwen2_5_0_5b")
    base = dict(
        num_labels=3,
        lora_r=8,
        target_modules=["q_proj", "v_proj"],
        precision="fp16",
        load_in_4bit=False,
        micro_batch=4,
        max_length=256,
        gradient_checkpointing=False,
        on_cuda=True,
    )
    ref = estimate_memory(arch, Workload(**base))
    assert (
        estimate_memory(arch, Workload(**{**base, "gradient_checkpointing": True})).activations_gib
        < ref.activations_gib
    )
    assert estimate_memory(arch, Workload(**{**base, "micro_batch": 8})).activations_gib == pytest.approx(
        2 * ref.activations_gib
    )
    assert estimate_memory(arch, Workload(**{**base, "lora_r": None})).trainable_params == ref.total_params
    lora_16 = estimate_memory(arch, Workload(**{**base, "lora_r": 16})).trainable_params
    head = arch["hidden_size"] * 3
    assert lora_16 - head == 2 * (ref.trainable_params - head)  # LoRA params scale with r


def test_pretrained_false_builds_qwen2_5_0_5b_shape_offline():
    tok = train_tokenizer(['{"a": 1}', '{"b": true}'], vocab_size=300)
    source = ModelSource(name="qwen2_5_0_5b", pretrained=False, arch="qwen2_5_0_5b")
    with torch.device("meta"):  # same code path, no 2 GB allocation
        model = source.load_model(["long", "short", "skip"], tok)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 494e6) / 494e6 < 0.01  # published: 0.49B parameters (tied embeddings, no LM head)
    assert model.config.hidden_size == 896 and model.config.num_hidden_layers == 24


@pytest.mark.parametrize(
    "override, key",
    [
        (["hardware.load_in_4bit=true"], "hardware.load_in_4bit"),
        (["hardware=rtx3050"], "hardware.device"),  # no CUDA on this machine
        (["hardware.precision=fp8"], "hardware.precision"),
        (["hardware.preflight=maybe"], "hardware.preflight"),
    ],
)
def test_bad_hardware_values_fail_in_one_line(override, key, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as err:
        check(compose_cfg("lora=default", *override))
    assert str(err.value).startswith(key) and "\n" not in str(err.value)


def test_lora_over_a_16_bit_base_trains_fp32_weights_with_a_grad_scaler():
    from peft import LoraConfig

    from loralab.models.lora import apply_lora

    tok = train_tokenizer(['{"a": 1}', '{"b": true}'] * 5, vocab_size=300)
    base = ModelSource(name="tiny_qwen2", pretrained=False, arch="tiny_qwen2").load_model(
        ["long", "short", "skip"], tok, dtype=torch.float16
    )
    model = apply_lora(base, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"]))
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable) and set(trainable.values()) == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.float16}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scaler = torch.amp.GradScaler("cpu")
    batch = tok(['{"a": 1}', '{"b": true}'], padding=True, return_tensors="pt")
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(**batch, labels=torch.tensor([0, 1])).loss
    scaler.scale(loss).backward()
    scaler.unscale_(opt)  # raises "Attempting to unscale FP16 gradients" if any trainable weight is fp16
    scaler.step(opt)


def test_the_docs_memory_table_is_what_the_estimator_says(fake_cuda):
    """docs/hardware.md's fit table, cell by cell, against ``check_memory`` on the composed configs it names."""
    text = (Path(CONF).parent / "docs" / "hardware.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| model (LoRA r=8, max_length 256)"))
    lines = text.splitlines()
    table = lines[lines.index(header) + 2 :]
    table = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in table[: next((i for i, line in enumerate(table) if not line.startswith("|")), len(table))]
    ]
    columns = {
        "rtx3050 (4 GB)": ["hardware=rtx3050"],
        "rtx3050 + 4-bit": ["hardware=rtx3050", "hardware.load_in_4bit=true"],
        "a100 (micro 16)": ["hardware=a100"],
        "h100 (micro 32)": ["hardware=h100"],
    }
    names = [cell.strip() for cell in header.strip("|").split("|")][1:]
    assert names == list(columns) and len(table) == 4
    for model, *cells in table:
        for name, cell in zip(names, cells):
            cfg = compose_cfg(f"model={model}", "lora=default", "lora.r=8", "model.max_length=256", *columns[name])
            est = check_memory(
                cfg.model,
                cfg.lora,
                cfg.hardware,
                num_labels=len(cfg.data.labels),
                batch_size=cfg.optim.batch_size,
                mode="off",
            )
            assert cell == f"{est.total_gib:.1f} GiB", (model, name)
