"""From records to token ids: serialization, tokenization, and batching."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from loralab.data.records import Record
from loralab.data.serialize import serialize, serialize_records  # noqa: F401  (serialize: re-exported)
from loralab.fs import atomic_path

log = logging.getLogger(__name__)


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever the tokenizer would produce different ids (vocab, merges, normaliser, special tokens)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec.pop("truncation", None), spec.pop("padding", None)  # call-time state, set by every tokenizer() call
    spec["loralab"] = [tokenizer.truncation_side, tokenizer.special_tokens_map]
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


# A text is cut to max_length x this many characters before tokenizing, so a long text costs no more than a short
# one (a 10 MB row took 2.8 GB and most of a minute to tokenize whole, to keep its first max_length tokens). Tokens
# average 3-5 characters, so the cut is far past the last token kept; the kept tokens could differ only if the
# first max_length of them averaged over 64 characters each.
MAX_CHARS_PER_TOKEN = 64


def clip(text: str, max_length: int, side: str) -> str:
    """The part of ``text`` that truncation at ``max_length`` tokens on ``side`` can keep."""
    limit = max_length * MAX_CHARS_PER_TOKEN
    return text if len(text) <= limit else (text[-limit:] if side == "left" else text[:limit])


def tokenize(texts: Sequence[str], tokenizer, max_length: int, cache_dir: str | Path | None = None) -> list[list[int]]:
    """Token ids per text. Each distinct text is tokenized once (oversampling repeats rows), and the result is
    cached on disk as safetensors, keyed by the texts, the tokenizer and ``max_length``: a rerun or sweep job on
    the same data skips tokenization, and any change to data, template or tokenizer misses the cache."""
    texts = [clip(t, max_length, tokenizer.truncation_side) for t in texts]
    unique = list(dict.fromkeys(texts))
    path = None
    if cache_dir is not None:
        key = hashlib.sha256()
        for part in (tokenizer_fingerprint(tokenizer), str(max_length), *unique):
            key.update(part.encode() + b"\0")
        path = Path(cache_dir) / f"{key.hexdigest()[:32]}.safetensors"
    if path is not None and path.is_file():
        cached = load_file(path)
        flat, offsets = cached["ids"].tolist(), cached["offsets"].tolist()
        ids = [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        log.info("tokenized %d texts: from cache %s", len(unique), path.name)
    else:
        ids = tokenizer(unique, truncation=True, max_length=max_length)["input_ids"]
        if path is not None:
            offsets = torch.tensor([0, *torch.tensor([len(x) for x in ids]).cumsum(0).tolist()], dtype=torch.int64)
            with atomic_path(path) as tmp:  # DDP ranks may write the same cache file at once
                save_file(
                    {"ids": torch.tensor([t for x in ids for t in x], dtype=torch.int64), "offsets": offsets}, tmp
                )
    by_text = dict(zip(unique, ids))
    return [by_text[t] for t in texts]


class TokenizedTexts(Dataset):
    """Token ids of each text, tokenized once up front (not per epoch), and its target: a class id, a score vector,
    or none (inference). Every text model's dataset, whatever its record format."""

    def __init__(
        self,
        texts: Sequence[str],
        ids: Sequence[str | int],
        labels: Sequence[Any] | None,
        tokenizer,
        max_length: int,
        cache_dir: str | Path | None = None,
    ):
        self.input_ids: list[list[int]] = tokenize(texts, tokenizer, max_length, cache_dir)
        self.ids = list(ids)
        self.labels = list(labels) if labels is not None else None
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


class TokenizedRecords(TokenizedTexts):
    """Feature records: the serialized features, and the label's id (``label2id=None``: unlabelled).
    ``serializer``: a fitted ``loralab.data.serialize`` serializer, or a template for the ``json`` form."""

    def __init__(
        self,
        records: Sequence[Record],
        tokenizer,
        label2id: dict[str, int] | None,
        serializer: Callable[[Mapping[str, Any]], str] | str,
        max_length: int,
        cache_dir: str | Path | None = None,
    ):
        super().__init__(
            serialize_records(records, serializer),
            [r.id for r in records],
            [label2id[r.label] for r in records] if label2id is not None else None,
            tokenizer,
            max_length,
            cache_dir,
        )


def length_sorted_order(dataset: TokenizedTexts) -> list[int]:
    """Indices longest first: eval/predict batches then pad little and the first batch shows peak memory."""
    return sorted(range(len(dataset)), key=lambda i: -len(dataset.input_ids[i]))
