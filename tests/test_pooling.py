"""The tiny offline Qwen2: right padding, a pad token, and batched logits equal to one-by-one logits."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from conftest import LABELS
from loralab.data.demo import make_rows
from loralab.data.text import serialize
from loralab.models.build import ModelSource

TEXTS = [serialize(r["features"]) for r in make_rows(40, seed=1)]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    source = ModelSource(name="tiny_qwen2", pretrained=False, arch="tiny_qwen2", tokenizer_vocab_size=300)
    tokenizer = source.load_tokenizer(TEXTS)
    return source.load_model(LABELS, tokenizer).eval(), tokenizer


def test_tokenizer_pads_on_the_right_with_a_pad_token(tiny):
    model, tokenizer = tiny
    assert tokenizer.padding_side == "right"
    assert tokenizer.pad_token is not None
    assert model.config.pad_token_id == tokenizer.pad_token_id is not None
    assert model.config.id2label == dict(enumerate(LABELS))


def test_batched_logits_equal_one_by_one(tiny):
    model, tokenizer = tiny
    texts = [TEXTS[0], TEXTS[1][:40], TEXTS[2][:90], "{}"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == len(texts)  # really different lengths, so really padded
    assert (batch["input_ids"][:, -1] == tokenizer.pad_token_id).sum() == len(texts) - 1  # padding on the right
    with torch.inference_mode():
        batched = model(**batch).logits
        single = torch.cat([model(**tokenizer(t, return_tensors="pt")).logits for t in texts])
    assert batched.shape == (len(texts), len(LABELS))
    assert_close(batched, single, atol=1e-5, rtol=0)
