"""Hardware profiles: resolving ``auto`` values and a memory preflight that runs before any weights load.

The preflight reads the model's own config.json (``ModelSource.architecture``: a local dir, the HF cache, or a
shipped Qwen config), counts parameters exactly by building the architecture on PyTorch's ``meta`` device (no
memory, no weights) and wrapping it with peft as training will (so LoRA's count is peft's, whatever the architecture
and ``lora.target_modules``), and adds the usual training costs. It is an estimate — allocator fragmentation and
kernels' workspaces come on top — so it refuses only clear misfits and logs every term so a user can see what to
cut. Training runs it before loading weights; ``loralab-preflight`` runs it alone.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from hydra.utils import instantiate
from transformers import AutoConfig, AutoModelForSequenceClassification, PretrainedConfig

from loralab.errors import ConfigError

log = logging.getLogger(__name__)

GIB = 2**30
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
CUDA_CONTEXT_GIB = 0.5  # CUDA context + cuBLAS workspaces, before any tensor


@dataclass
class MemoryEstimate:
    weights_gib: float
    trainable_params: int
    total_params: int
    trainable_gib: float  # trainable weights (fp32 master copies) + their gradients + AdamW's two moments
    activations_gib: float
    overhead_gib: float

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.trainable_gib + self.activations_gib + self.overhead_gib

    def describe(self) -> str:
        return (
            f"~{self.total_gib:.1f} GiB = weights {self.weights_gib:.2f} + trainable state "
            f"{self.trainable_gib:.2f} ({self.trainable_params:,} params) + activations "
            f"{self.activations_gib:.2f} + overhead {self.overhead_gib:.2f}"
        )


def meta_model(arch: dict[str, Any] | PretrainedConfig, num_labels: int):
    if isinstance(arch, dict):
        config = AutoConfig.for_model(**{**arch, "vocab_size": arch.get("vocab_size") or 32000})
    else:
        config = copy.deepcopy(arch)
    config.num_labels = num_labels
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(config)


def lora_trainable(model, r: int, target_modules: Sequence[str] | str | None) -> int:
    """What peft trains (adapters + the saved head) on ``model``: ``target_modules`` None is peft's default for the
    architecture, ``all-linear`` every linear layer but the head. A target peft cannot place is a ConfigError."""
    # peft (~2 s of CPU to import) loads only for a LoRA run's estimate: an MLP run or a config error never needs it
    from peft import LoraConfig, get_peft_model

    try:
        wrapped = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=r, target_modules=target_modules))
    except ValueError as err:
        raise ConfigError(
            f"lora.target_modules={target_modules!r}: {str(err).splitlines()[0]} (model type {model.config.model_type})"
        ) from None
    return sum(p.numel() for p in wrapped.parameters() if p.requires_grad)


@dataclass(frozen=True)
class Workload:
    """What one training step holds in memory besides the architecture."""

    num_labels: int
    lora_r: int | None  # None: full fine-tuning
    target_modules: Sequence[str] | str | None  # as lora.target_modules: None = peft's default per architecture
    precision: str  # fp32 | bf16 | fp16
    load_in_4bit: bool
    micro_batch: int
    max_length: int
    gradient_checkpointing: bool
    on_cuda: bool


def estimate_memory(arch: dict[str, Any] | PretrainedConfig, w: Workload) -> MemoryEstimate:
    """Peak training memory: weights + trainable state + activations (+ CUDA context)."""
    model = meta_model(arch, w.num_labels)
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    c = model.config
    if w.lora_r:
        trainable = lora_trainable(model, w.lora_r, w.target_modules)
        if w.load_in_4bit:  # NF4 blocks (~0.5 B + constants) for Linear layers; embeddings stay 16-bit
            weights = (total - embed) * 0.53 + embed * 2
        else:
            weights = total * BYTES[w.precision]
    else:
        trainable, weights = total, 0  # full fine-tuning: the weights are the fp32 trainable state below
    trainable_bytes = trainable * 16  # fp32 weight + fp32 grad + AdamW exp_avg + exp_avg_sq
    d, layers = c.hidden_size, c.num_hidden_layers
    ffn = getattr(c, "intermediate_size", None) or 4 * d  # configs without the name use the classic 4·d
    tokens = w.micro_batch * w.max_length
    act_bytes = BYTES[w.precision]
    # Stored activations per layer and token, in elements: Korthikanti et al. (2022) ~34·d for a transformer
    # layer without the attention matrix (SDPA never materialises it), scaled for the MLP's width (SwiGLU's too).
    per_layer = tokens * (10 * d + 4 * ffn) * act_bytes
    if w.gradient_checkpointing:  # keep each layer's input; recompute one layer at a time in backward
        activations = layers * tokens * d * act_bytes + per_layer
    else:
        activations = layers * per_layer
    return MemoryEstimate(
        weights_gib=weights / GIB,
        trainable_params=trainable,
        total_params=total,
        trainable_gib=trainable_bytes / GIB,
        activations_gib=activations / GIB,
        overhead_gib=CUDA_CONTEXT_GIB if w.on_cuda else 0.0,
    )


def preflight(est: MemoryEstimate, memory_gib: float | None, mode: str, what: str) -> None:
    """``mode``: error (refuse a misfit), warn (log and go on), off."""
    if mode == "off" or memory_gib is None:
        log.info(
            "memory preflight skipped (%s): %s", "off" if mode == "off" else "device memory unknown", est.describe()
        )
        return
    if est.total_gib <= memory_gib:
        log.info("memory preflight: %s fits in %.1f GiB: %s", what, memory_gib, est.describe())
        return
    message = (
        f"hardware.preflight: {what} needs {est.describe()} > {memory_gib:.1f} GiB on this device; try "
        f"hardware.load_in_4bit=true, lora=default, a smaller hardware.micro_batch_size or model.max_length, "
        f"hardware.gradient_checkpointing=true, or hardware.preflight=warn to try anyway"
    )
    if mode == "warn":
        log.warning(message)
    else:
        raise ConfigError(message)


def run_label(model_name: str, lora, hardware_name: str) -> str:
    """How messages name a combination: ``qwen2_5_0_5b (lora=r=8) on hardware=rtx3050``; ``lora=none`` trains every
    weight, ``lora=auto`` decides by the training rows (estimated as every weight, the larger)."""
    if lora.enabled == "auto":
        how = f"auto: r={lora.r} under {lora.full_from_rows} training rows, none from there"
    else:
        how = f"r={lora.r}" if lora.enabled and lora.r else "none"
    return f"{model_name} (lora={how}) on hardware={hardware_name}"


def check_memory(model, lora, hardware, *, num_labels: int, batch_size: int, mode: str | None = None) -> MemoryEstimate:
    """Estimate training memory for the ``model`` x ``lora`` x ``hardware`` groups (hardware ``auto`` values
    resolved) at ``optim.batch_size``; refuse a clear misfit before any weights load. ``mode`` overrides
    ``hardware.preflight`` (``loralab-preflight`` always asks for a verdict: error)."""
    config = instantiate(model).architecture()  # the ModelSource training builds
    limit = getattr(config, "max_position_embeddings", None)
    if limit and model.max_length > limit:
        raise ConfigError(
            f"model.max_length={model.max_length}: must be <= {limit}, the max_position_embeddings "
            f"of this {config.model_type} model"
        )
    r = lora.r if lora.enabled is True else None  # lora=auto: estimated as full fine-tuning, the larger of two
    targets = lora.target_modules
    est = estimate_memory(
        config,
        Workload(
            num_labels=max(num_labels, 1),
            lora_r=r,
            target_modules=targets if targets is None or isinstance(targets, str) else list(targets),
            precision=str(hardware.precision),
            load_in_4bit=hardware.load_in_4bit,
            micro_batch=hardware.micro_batch_size or batch_size,
            max_length=model.max_length,
            gradient_checkpointing=hardware.gradient_checkpointing,
            on_cuda=str(hardware.device).startswith("cuda"),
        ),
    )
    preflight(est, hardware.memory_gib, mode or hardware.preflight, run_label(model.name, lora, hardware.name))
    return est
