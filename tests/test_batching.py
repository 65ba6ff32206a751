"""The training path's batching: epoch-deterministic sampler, tokenization cache, dynamic padding."""

import random

import pytest
import torch
from omegaconf import OmegaConf
from transformers import DataCollatorWithPadding

from loralab.core.distributed import Dist
from loralab.core.loaders import TaskData, make_loaders
from loralab.core.sampler import EpochBatchSampler
from loralab.data.text import tokenize
from loralab.errors import ConfigError
from loralab.models.build import ModelSource, train_tokenizer

_rng = random.Random(0)
LENGTHS = [_rng.randint(5, 120) for _ in range(203)]


@pytest.mark.parametrize("group", [True, False])
def test_sampler_covers_every_example_once_per_epoch(group):
    sampler = EpochBatchSampler(LENGTHS, 16, seed=3, group_by_length=group, bucket_size=4)
    seen = []
    for epoch in (1, 2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(LENGTHS)))
        seen.append(flat)
    assert seen[0] != seen[1]  # reshuffled every epoch


def test_sampler_is_a_pure_function_of_seed_and_epoch_and_skips_for_resume():
    a, b = (EpochBatchSampler(LENGTHS, 16, seed=3) for _ in range(2))
    a.set_epoch(2)
    b.set_epoch(2, start_batch=5)
    assert list(a)[5:] == list(b)


def test_length_grouping_cuts_padding():
    def padded_tokens(sampler):
        sampler.set_epoch(1)
        return sum(len(b) * max(LENGTHS[i] for i in b) for b in sampler)

    grouped = padded_tokens(EpochBatchSampler(LENGTHS, 16, seed=0, group_by_length=True))
    plain = padded_tokens(EpochBatchSampler(LENGTHS, 16, seed=0, group_by_length=False))
    assert grouped < 0.8 * plain


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("group", [True, False])
def test_ranks_get_disjoint_shards_with_equal_batch_counts(world_size, group):
    """203 rows in batches of 16 make 13 batches: no rank sees a row another rank sees, every rank runs the same
    number of batches (its ``len`` too, which the trainer's step count uses), and only the ``13 % world_size``
    leftover batches go unseen that epoch."""
    for epoch in (1, 2):
        shards = []
        for rank in range(world_size):
            s = EpochBatchSampler(
                LENGTHS, 16, seed=1, group_by_length=group, bucket_size=4, rank=rank, world_size=world_size
            )
            s.set_epoch(epoch)
            shards.append(list(s))
            assert len(shards[-1]) == len(s) == 13 // world_size
        rows = [i for shard in shards for b in shard for i in b]
        assert len(rows) == len(set(rows))  # disjoint
        whole = EpochBatchSampler(LENGTHS, 16, seed=1, group_by_length=group, bucket_size=4)
        whole.set_epoch(epoch)
        kept = list(whole)[: 13 // world_size * world_size]
        assert sorted(rows) == sorted(i for b in kept for i in b)  # the single-process epoch, minus the leftovers


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(['{"atr": 1.25, "ext_dir": -1}', '{"session": "london", "wave": 0.7}'] * 20, 300)


def test_tokenization_cache_hits_and_invalidates(tokenizer, tmp_path):
    texts = ['{"a": 1}', '{"b": 2}', '{"a": 1}']
    first = tokenize(texts, tokenizer, 32, tmp_path)
    (cached,) = tmp_path.iterdir()
    written = cached.stat()
    assert tokenize(texts, tokenizer, 32, tmp_path) == first == tokenize(texts, tokenizer, 32, None)
    again = cached.stat()  # a hit reads the file; a miss would write a new one over it (new inode, atomic rename)
    assert (again.st_ino, again.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
    tokenize(['{"a": 1}', '{"b": 3}'], tokenizer, 32, tmp_path)  # data changed
    tokenize([f"features: {t}" for t in texts], tokenizer, 32, tmp_path)  # template changed
    tokenize(texts, tokenizer, 8, tmp_path)  # max_length changed
    other = train_tokenizer(['{"zzz": 9}'] * 5, 280)
    tokenize(texts, other, 32, tmp_path)  # tokenizer changed
    assert len(list(tmp_path.iterdir())) == 5


def test_dynamic_padding_never_changes_logits(tokenizer):
    torch.manual_seed(0)
    model = ModelSource(name="tiny_qwen2", pretrained=False, arch="tiny_qwen2").load_model(["a", "b", "c"], tokenizer)
    model.eval()
    texts = ['{"atr": 1.25}', '{"session": "london", "wave": 0.7, "ext_dir": -1}', '{"x": 1}']
    ids = tokenize(texts, tokenizer, 64)
    batch = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)([{"input_ids": x} for x in ids])
    assert batch["input_ids"].shape[1] % 8 == 0
    with torch.no_grad():
        batched = model(**batch).logits
        single = torch.cat([model(input_ids=torch.tensor([x])).logits for x in ids])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_trained_tokenizer_reads_numbers_one_digit_per_token():
    """Even numbers the training texts repeat often enough for BPE to merge them come out one digit per token."""
    tok = train_tokenizer(['{"price": 1234.5678, "atr": 99}'] * 50, 300)
    pieces = tok.convert_ids_to_tokens(tok('{"price": 1234.5678, "atr": 99}')["input_ids"])
    digits = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digits == list("12345678") + ["9", "9"]


def test_fewer_batches_than_processes_is_refused_before_training():
    """With every leftover batch dropped, 5 rows in per-rank batches of 8 would leave both ranks nothing to run."""
    data = TaskData(train=[{"x": i} for i in range(5)], val=[{"x": 0}])
    hardware = OmegaConf.create({"micro_batch_size": None, "num_workers": 0, "pin_memory": False, "device": "cpu"})
    trainer = OmegaConf.create({"group_by_length": False, "eval_batch_size": 4})
    with pytest.raises(ConfigError, match=r"optim.batch_size=16: 5 training rows make fewer batches than the 2 "):
        make_loaders(data, batch_size=16, hardware=hardware, trainer=trainer, seed=0, ddp=Dist(rank=1, world_size=2))
