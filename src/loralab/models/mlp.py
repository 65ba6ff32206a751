"""The MarketSentinel model (input_dim → hidden → targets) and its best-only checkpoint file."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from loralab.fs import atomic_path


class MLPRegressor(nn.Module):
    """One hidden ReLU layer. Returns ``.logits`` like a transformers model, so ``loop.fit`` drives both."""

    def __init__(self, input_dim: int, hidden_dim: int = 128, output_dim: int = 2):
        super().__init__()
        self.input_dim, self.hidden_dim, self.output_dim = input_dim, hidden_dim, output_dim
        self.net = nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, output_dim))

    def forward(self, features: torch.Tensor) -> SequenceClassifierOutput:
        return SequenceClassifierOutput(logits=self.net(features))


def save_best(path: str | Path, model: MLPRegressor, epoch: int, val_loss: float) -> Path:
    """Write ``{model_state_dict, input_dim, hidden_dim, epoch, val_loss}`` — no optimizer state, no data —
    atomically: a crash leaves the previous best intact, never half a file."""
    payload = {
        "model_state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "input_dim": int(model.input_dim),
        "hidden_dim": int(model.hidden_dim),
        "epoch": int(epoch),
        "val_loss": float(val_loss),
    }
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        torch.save(payload, fh)
    return Path(path)


def load_best(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[MLPRegressor, dict]:
    """The model of a ``save_best`` file (tensors and plain numbers only: ``weights_only=True``) and its record."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    state = ckpt["model_state_dict"]
    model = MLPRegressor(ckpt["input_dim"], ckpt["hidden_dim"], output_dim=state["net.2.weight"].shape[0])
    model.load_state_dict(state)
    return model.eval(), ckpt
