"""Pinned losses (torchtune style): the exact train loss of the first optimizer steps of the tiny model under a
fixed seed. Any refactor of data, tokenizer, model, loss, sampler, optimizer or the trainer that changes the
numbers fails here loudly. The values were produced by the pre-refactor loop (``loralab.loop.fit``, commit
36dfa10) and the ``Trainer`` alike; update them only for an intended change, and say why in the commit."""

from __future__ import annotations

import torch
from conftest import optim_conf, trainer_conf
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, set_seed

from loralab.core.checkpoint import Checkpoints
from loralab.core.sampler import EpochBatchSampler
from loralab.core.trainer import FitInputs, Trainer
from loralab.data.demo import write_demo
from loralab.data.records import load_records
from loralab.data.text import TokenizedRecords, serialize
from loralab.losses import FocalLoss
from loralab.models.build import ModelSource

LABELS = ["long", "short", "skip"]
PINNED = [0.57894152, 0.56731635, 0.44951651]  # focal loss (gamma 1.5) of steps 1-3, batch 16, AdamW 2e-4 cosine


class RecordingLoss(FocalLoss):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.values: list[float] = []

    def forward(self, logits, y):
        out = super().forward(logits, y)
        self.values.append(out.item())
        return out


def test_first_three_steps_match_the_pinned_losses(tmp_path):
    train, _ = write_demo(tmp_path, n_train=64, n_val=16)
    set_seed(0)
    records = load_records(train, LABELS)[0]
    source = ModelSource(name="tiny_qwen2", pretrained=False, arch="tiny_qwen2", tokenizer_vocab_size=300)
    tokenizer = source.load_tokenizer([serialize(r.features) for r in records])
    # serialize=json explicitly (a template string is the json form), whatever conf/train.yaml's default is.
    data = TokenizedRecords(records, tokenizer, {label: i for i, label in enumerate(LABELS)}, "{features}", 256)
    model = source.load_model(LABELS, tokenizer)
    loader = DataLoader(
        data,
        batch_sampler=EpochBatchSampler(data.lengths, 16, 0),
        collate_fn=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8),
    )
    loss = RecordingLoss(gamma=1.5)
    trainer = Trainer(
        trainer_conf(1, monitor="val_loss", mode="min", patience=1),
        optim_conf(
            "torch.optim.AdamW", lr=2e-4, weight_decay=0.01, scheduler="cosine", warmup_ratio=0.06, max_grad_norm=1.0
        ),
        precision="fp32",
        device=torch.device("cpu"),
        progress=False,
    )
    trainer.setup(
        FitInputs(model, loss, loader, loader, metric_fn=lambda y, p: {}),
        Checkpoints(tmp_path / "checkpoints", keep=1, mode="min", meta={}),
    )
    trainer.fit()
    torch.testing.assert_close(torch.tensor(loss.values[:3]), torch.tensor(PINNED), rtol=1e-5, atol=1e-6)
