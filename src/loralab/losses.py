"""Class-weighted focal loss and the class weights it uses."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def class_weights(counts: Sequence[int], mode: str | Sequence[float] | None) -> list[float] | None:
    """Per-class loss weights from training counts.

    ``auto``: inverse frequency, normalised to mean 1 over the classes present; ``sqrt_inverse``: its square root
    (gentler); ``none``/None: no weights; a list: used as given. Absent classes get 1 (they never occur as targets).
    """
    if mode is None or (isinstance(mode, str) and mode == "none"):
        return None
    if not isinstance(mode, str):
        weights = [float(w) for w in mode]
        if len(weights) != len(counts):
            raise ValueError(f"loss.class_weights has {len(weights)} values for {len(counts)} labels")
        return weights
    if mode not in ("auto", "sqrt_inverse"):
        raise ValueError(f"loss.class_weights={mode!r}: expected auto, sqrt_inverse, none or a list")
    present = [n for n in counts if n > 0]
    total = sum(present)
    raw = [total / (len(present) * n) if n > 0 else None for n in counts]
    if mode == "sqrt_inverse":
        raw = [math.sqrt(w) if w is not None else None for w in raw]
    mean = sum(w for w in raw if w is not None) / len(present)
    return [w / mean if w is not None else 1.0 for w in raw]


class FocalLoss(nn.Module):
    """FL = α_t (1 − p_t)^γ · CE, averaged with the class weights as denominator (as ``F.cross_entropy`` does).

    γ = 0 gives exactly weighted cross-entropy; γ > 0 shrinks the loss of examples the model already gets right.
    """

    def __init__(self, gamma: float = 1.5, class_weights: Sequence[float] | None = None):
        super().__init__()
        if gamma < 0:
            raise ValueError(f"loss.gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        weight = torch.tensor(list(class_weights), dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=-1)
        log_pt = log_p.gather(1, target[:, None]).squeeze(1)
        loss = -log_pt
        if self.gamma:
            # -expm1(log p_t) is 1 - p_t without exp() rounding it to 0 for confident examples; the clamp keeps
            # pow's gradient finite (not inf * 0 = NaN) for gamma < 1 when 1 - p_t still underflows to 0.
            one_minus_pt = (-torch.expm1(log_pt)).clamp_min(torch.finfo(log_pt.dtype).tiny)
            loss = one_minus_pt.pow(self.gamma) * loss
        if self.weight is None:
            return loss.mean()
        w = self.weight.to(loss.device)[target]
        return (w * loss).sum() / w.sum()

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, weight={None if self.weight is None else self.weight.tolist()}"


class SummedHeadMSE(nn.Module):
    """MSE(head 0) + MSE(head 1) + …: each head's error counts fully, whatever the number of heads."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(pred.dtype)
        return sum(F.mse_loss(pred[:, i], target[:, i]) for i in range(pred.shape[1]))
