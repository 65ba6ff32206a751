"""Wrapping a model with LoRA (peft), or leaving every weight trainable."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


def lora_config(enabled: bool | str = True, full_from_rows=None, full_lr=None, **kwargs) -> LoraConfig | None:
    """``conf/lora``'s target: a peft ``LoraConfig``, or None for full fine-tuning (``enabled: false``).
    ``full_from_rows`` and ``full_lr`` are the run's to use (``LoraConf.for_train_rows``), not peft's."""
    if enabled == "auto":
        raise ValueError("lora.enabled=auto: decide it with LoraConf.for_train_rows before building the model")
    # peft (~2 s of CPU to import) loads when a LoRA model is built, not with every module that may build one
    from peft import LoraConfig

    return LoraConfig(**kwargs) if enabled else None


def apply_lora(model: PreTrainedModel, config: LoraConfig | None) -> PreTrainedModel | PeftModel:
    """``config=None`` means full fine-tuning. With ``task_type=SEQ_CLS`` peft keeps the ``score`` head trainable
    and saves it with the adapter, so the head is never lost on save/reload."""
    if config is None:
        model.requires_grad_(True)
        wrapped = model
    else:
        from peft import get_peft_model

        wrapped = get_peft_model(model, config)
        # peft keeps LoRA weights in fp32 over a 16-bit base, but its trainable copy of the score head keeps the
        # base dtype; fp16 gradients cannot be unscaled by a GradScaler, and 16-bit updates lose small steps.
        for param in wrapped.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    log.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return wrapped
