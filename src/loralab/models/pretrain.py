"""A causal LM shaped the way the trainer sees every model, so continued pretraining reuses ``core.Trainer``.

The trainer calls ``model(**batch).logits`` and ``loss(logits, y)`` and gathers logits per row for evaluation.
Full next-token logits (rows x tokens x vocabulary) would be gathered for nothing, so ``TokenNLL`` returns two
numbers per row instead: the summed next-token negative log-likelihood and the number of predicted tokens.
``MeanTokenNLL`` turns any batch of them into the mean per-token LM loss (the usual causal-LM loss).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn


class TokenNLL(nn.Module):
    """``.logits`` = ``[[summed next-token NLL, predicted tokens]]`` per row; pads (attention mask 0) count nothing."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        targets, mask = input_ids[:, 1:], attention_mask[:, 1:].to(torch.float32)
        nll = F.cross_entropy(logits.transpose(1, 2).float(), targets, reduction="none") * mask
        return SimpleNamespace(logits=torch.stack([nll.sum(1), mask.sum(1)], dim=-1))


class MeanTokenNLL(nn.Module):
    """Mean NLL per predicted token over the batch (``y`` is unused: texts are their own targets)."""

    def forward(self, outputs: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return outputs[:, 0].sum() / outputs[:, 1].sum().clamp(min=1.0)
