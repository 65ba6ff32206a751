"""From records to token ids: serialization, tokenization, and batching."""

from __future__ import annotations

import json
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from loralab.data.records import Record


def serialize(features: dict[str, Any], template: str = "{features}") -> str:
    """Feature text the model reads. Sorted keys make the text independent of the writer's key order."""
    return template.format(features=json.dumps(features, sort_keys=True, ensure_ascii=True))


class TokenizedRecords(Dataset):
    """Token ids of each record's feature text, tokenized once up front (not per epoch)."""

    def __init__(self, records: Sequence[Record], tokenizer, label2id: dict[str, int] | None,
                 template: str, max_length: int):
        texts = [serialize(r.features, template) for r in records]
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        self.input_ids: list[list[int]] = enc["input_ids"]
        self.ids = [r.id for r in records]
        self.labels = [label2id[r.label] for r in records] if label2id is not None else None
        self.truncated = sum(len(ids) >= max_length for ids in self.input_ids)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"input_ids": self.input_ids[i]}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]


def length_sorted_order(dataset: TokenizedRecords) -> list[int]:
    """Indices longest first: eval/predict batches then pad little and the first batch shows peak memory."""
    return sorted(range(len(dataset)), key=lambda i: -len(dataset.input_ids[i]))


def batch_to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
