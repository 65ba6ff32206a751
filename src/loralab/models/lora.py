"""Wrapping a model with LoRA (peft), or leaving every weight trainable."""

from __future__ import annotations

import logging

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

log = logging.getLogger(__name__)


def apply_lora(model: PreTrainedModel, config: LoraConfig | None) -> PreTrainedModel | PeftModel:
    """``config=None`` means full fine-tuning. With ``task_type=SEQ_CLS`` peft keeps the ``score`` head trainable
    and saves it with the adapter, so the head is never lost on save/reload."""
    if config is None:
        model.requires_grad_(True)
        wrapped = model
    else:
        wrapped = get_peft_model(model, config)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    log.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return wrapped
