"""loralab.core.device.resolve_device: auto picks what exists; a device this machine lacks fails with the fix."""

import pytest
import torch

from loralab.core.device import resolve_device
from loralab.errors import ConfigError


def test_auto_and_explicit_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_missing_or_unknown_devices_are_config_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA is not available.*use cpu or auto"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="not a torch device"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="has 1 CUDA device"):
        resolve_device("cuda:1")


def test_the_small_gpu_memory_savers_train_on_cpu_without_deprecation_warnings():
    """What ``hardware=rtx3050`` turns on besides fp16 and CUDA: activation checkpointing under peft's LoRA, in a
    16-bit autocast (bf16 here, which CPUs run natively). One step: the adapters get gradients through the recomputed
    layers, and loralab's own calls raise none of transformers' deprecation warnings."""
    import warnings

    from conftest import typed_conf

    from loralab.core.trainer import autocast
    from loralab.models.build import ModelSource
    from loralab.tasks.text_model import load_text_model

    conf = typed_conf("hardware.gradient_checkpointing=true", "hardware.precision=bf16", "lora=default")
    source = ModelSource(name="tiny_qwen2", pretrained=False, arch="tiny_qwen2", tokenizer_vocab_size=300)
    tokenizer = source.load_tokenizer(["atr=3 ext_dir=1 session=asia", "atr=7 ext_dir=-1 session=london"] * 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_text_model(
            source,
            ["long", "short", "skip"],
            tokenizer,
            hardware=conf.hardware,
            lora=conf.lora,
            device=torch.device("cpu"),
        )
    deprecated = {str(w.message).split("`")[1] for w in caught if "is deprecated" in str(w.message)}
    assert "gradient_checkpointing_enable" not in deprecated  # the name loralab used to call
    assert deprecated <= {"is_gradient_checkpointing"}  # peft reads that one itself: not ours to change
    assert model.base_model.model.is_activation_checkpointing
    assert model.config._attn_implementation == "sdpa"
    # the precision decides the frozen base's dtype on any device; the adapters and the head train in fp32
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    model.train()
    batch = tokenizer(["atr=3 ext_dir=1 session=asia"] * 4, return_tensors="pt")
    with autocast(torch.device("cpu"), "bf16"):
        logits = model(**batch).logits
    torch.nn.functional.cross_entropy(logits.float(), torch.tensor([0, 1, 2, 0])).backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None for g in lora_grads) and any(g.abs().sum() > 0 for g in lora_grads)
