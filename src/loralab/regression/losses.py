"""Losses defined outside the models, so a model is only a function from inputs to predictions."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class SummedHeadMSE(nn.Module):
    """MSE(head 0) + MSE(head 1) + …: each head's error counts fully, whatever the number of heads."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(pred.dtype)
        return sum(F.mse_loss(pred[:, i], target[:, i]) for i in range(pred.shape[1]))
