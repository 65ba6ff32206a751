"""Shared by the text tasks: the tokenizer (trained on the training texts for a random-init model, reused from the
checkpoint on resume, rank 0's on every DDP rank) and a Qwen2 sequence model with LoRA where configured."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from hydra.utils import instantiate
from transformers import AutoTokenizer

from loralab.config.schema import HardwareConf, LoraConf
from loralab.core.distributed import Dist
from loralab.models.build import ModelSource, enable_activation_checkpointing
from loralab.models.lora import apply_lora
from loralab.models.packing import enable_packing


def load_tokenizer(source: ModelSource, texts: Sequence[str], resume_dir: Path | None, ddp: Dist):
    """A resumed run reuses its checkpoint's tokenizer: a retrained one could split texts differently."""
    if resume_dir is not None:
        return source.configure(AutoTokenizer.from_pretrained(resume_dir / "tokenizer"))
    tokenizer = source.load_tokenizer(texts)
    if ddp.enabled and not source.pretrained:  # a trained tokenizer must be rank 0's on every rank
        tokenizer = source.tokenizer_from_json(ddp.broadcast(tokenizer.backend_tokenizer.to_str()))
    return tokenizer


def load_text_model(
    source: ModelSource,
    outputs: Sequence[str],
    tokenizer,
    *,
    hardware: HardwareConf,
    lora: LoraConf,
    device: torch.device,
    problem_type: str = "single_label_classification",
):
    """The sequence model with one output per name in ``outputs``, on ``device``; LoRA-wrapped if ``lora.enabled``;
    scoring packed batches too with ``hardware.packing`` (the train loader then packs: ``TaskData.train_collate``)."""
    # LoRA trains fp32 adapters on a frozen base, so the base can sit in 16 bits; full fine-tuning keeps fp32
    # master weights and gets its speed from autocast. The precision decides, not the device: a GPU profile with
    # hardware.device=cpu runs the same dtypes on the CPU (how CI trains every profile's path).
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(hardware.precision)
    dtype = half if lora.enabled and half is not None else torch.float32
    model = source.load_model(
        list(outputs),
        tokenizer,
        attn_implementation=hardware.attn_implementation,
        dtype=dtype,
        load_in_4bit=hardware.load_in_4bit,
        compute_dtype=half,
    )
    model.config.problem_type = problem_type  # saved with every checkpoint's config
    if hardware.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if hardware.packing:
        enable_packing(model)
    model = apply_lora(model, instantiate(lora))  # None (full fine-tuning) when lora.enabled is false
    if not hardware.load_in_4bit:  # bitsandbytes places quantized weights itself
        model = model.to(device)
    return model
