"""Padding-free packing (hardware.packing): a micro-batch's records in one row score the logits and gradients of the
padded batch (fp32: within 1e-5) for the tiny Qwen2 and a Qwen2.5-0.5B-shaped model, with and without LoRA, under
activation checkpointing and bf16 autocast; trained packed, the weights follow the padded run's; a packed run killed
after a val check resumes exactly; the packed batches of DDP shards hold every record once; the model's weights,
padded forward and copies are the stock ones."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import LABELS, optim_conf, run_result, trainer_conf
from peft import LoraConfig
from rich.console import Console
from torch import nn
from torch.testing import assert_close
from torch.utils.data import DataLoader
from transformers import BertConfig, DataCollatorWithPadding

from loralab.core.checkpoint import Checkpoints
from loralab.core.loaders import pack_records, padding_share
from loralab.core.sampler import EpochBatchSampler
from loralab.core.trainer import FitInputs, Trainer
from loralab.data.demo import make_rows
from loralab.data.text import serialize
from loralab.errors import ConfigError
from loralab.models.build import ModelSource, enable_activation_checkpointing, shipped_config
from loralab.models.lora import apply_lora
from loralab.models.packing import enable_packing
from loralab.reporting.console import padding_text, print_summary

TEXTS = [serialize(r["features"]) for r in make_rows(40, seed=1)]
FP32 = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The shipped tiny Qwen2, and Qwen2.5-0.5B's shape (widths, 14 query / 2 key-value heads, rope) cut to 2 of its
    24 layers and a 1024-token vocabulary so it builds in CPU CI (all 24 layers: bench/packing.py --check-only,
    docs/performance.md)."""
    arch = shipped_config("qwen2_5_0_5b") | dict(num_hidden_layers=2, vocab_size=1024, bos_token_id=0, eos_token_id=0)
    path = tmp_path_factory.mktemp("arch") / "qwen2_5_0_5b_2_layers.json"
    path.write_text(json.dumps(arch))
    tiny = ModelSource(name="tiny_qwen2", pretrained=False, arch="tiny_qwen2", tokenizer_vocab_size=300)
    qwen = ModelSource(name="qwen2_5_0_5b", pretrained=False, arch=str(path), tokenizer_vocab_size=1024)
    return {"tiny_qwen2": (tiny, tiny.load_tokenizer(TEXTS)), "qwen2_5_0_5b": (qwen, qwen.load_tokenizer(TEXTS))}


def classifier(source: ModelSource, tokenizer, *, lora: bool, checkpointing: bool = False, dropout: float = 0.0):
    """As ``load_text_model`` builds it: checkpointing, packing, then LoRA. Adapters start non-zero
    (``init_lora_weights=False``), so the LoRA path changes the logits it is compared on."""
    torch.manual_seed(0)
    model = source.load_model(LABELS, tokenizer)
    if checkpointing:
        enable_activation_checkpointing(model)
    enable_packing(model)
    if lora:
        config = LoraConfig(
            task_type="SEQ_CLS",
            r=4,
            target_modules=["q_proj", "v_proj"],
            lora_dropout=dropout,
            init_lora_weights=False,
        )
        model = apply_lora(model, config)
    return model


def features(tokenizer, n: int = 4) -> list[dict]:
    """Records of different lengths (5, 12, 19... tokens), so the padded batch pads every row but the longest."""
    return [{"input_ids": tokenizer(TEXTS[i])["input_ids"][: 5 + 7 * i], "labels": i % 3} for i in range(n)]


def both(tokenizer, feats) -> tuple[dict, dict]:
    padded = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)([dict(f) for f in feats])
    return padded, pack_records(feats)


def test_pack_records_restarts_positions_per_record():
    batch = pack_records([{"input_ids": [5, 6, 7], "labels": 2}, {"input_ids": [8], "labels": 0}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0]]
    assert batch["cu_seqlens"].tolist() == [0, 3, 4] and batch["cu_seqlens"].dtype == torch.int32
    assert batch["labels"].tolist() == [2, 0]
    with pytest.raises(ValueError, match="at least one token"):
        pack_records([{"input_ids": [5]}, {"input_ids": []}])


@pytest.mark.parametrize("arch", ["tiny_qwen2", "qwen2_5_0_5b"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_packed_logits_equal_padded_logits(sources, arch, lora):
    source, tokenizer = sources[arch]
    model = classifier(source, tokenizer, lora=lora).eval()
    padded, packed = both(tokenizer, features(tokenizer))
    assert padded["input_ids"].numel() > packed["input_ids"].numel()  # the padded batch does hold pads
    with torch.no_grad():
        reference = model(**{k: v for k, v in padded.items() if k != "labels"}).logits
        logits = model(**{k: v for k, v in packed.items() if k != "labels"}).logits
        # Positions that run on across records make it one long text: records see each other, logits change.
        leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1]).unsqueeze(0))
        leaked = model(**{k: v for k, v in leaky.items() if k != "labels"}).logits
    assert logits.shape == reference.shape == (4, len(LABELS))
    assert_close(logits, reference, **FP32)
    assert (leaked - reference)[1:].abs().max() > 1e-3  # the first record sees nothing before it either way


def test_packed_gradients_equal_padded_gradients(sources):
    """Train mode under activation checkpointing (the backward recomputes the packed forward), the loss on the
    records' logits: LoRA adapters and the head get the padded batch's gradients."""
    source, tokenizer = sources["tiny_qwen2"]
    model = classifier(source, tokenizer, lora=True, checkpointing=True).train()
    grads = []
    for batch in both(tokenizer, features(tokenizer)):
        model.zero_grad()
        y = batch.pop("labels")
        torch.nn.functional.cross_entropy(model(**batch).logits, y).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and any("lora_A" in n for n in grads[0])
    assert any("score" in n for n in grads[0])
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], **FP32, msg=name)


class Killed(BaseException):
    """A SIGKILL stand-in: nothing after it runs, only what is already on disk survives."""


class KilledAfterCheck(Checkpoints):
    def check(self, loop_state, step, epoch, value):
        super().check(loop_state, step, epoch, value)
        if step == 2:
            raise Killed


def fit(sources, ckpt_dir, *, packed: bool, dropout: float, checkpoints=Checkpoints, resume=None) -> nn.Module:
    """The trainer as a run sets it up: 16 records in length-grouped micro-batches of 4 (4 steps, a val check every
    2), LoRA, AdamW; the train loader packs or pads, the val loader pads."""
    source, tokenizer = sources["tiny_qwen2"]
    model = classifier(source, tokenizer, lora=True, dropout=dropout)
    records = [{"input_ids": tokenizer(text)["input_ids"], "labels": i % 3} for i, text in enumerate(TEXTS[:16])]
    pad = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)
    collate = pack_records if packed else (lambda rows: pad([dict(r) for r in rows]))
    lengths = [len(r["input_ids"]) for r in records]
    train = DataLoader(records, batch_sampler=EpochBatchSampler(lengths, 4, seed=0), collate_fn=collate)
    val = DataLoader(records[:4], batch_size=4, collate_fn=lambda rows: pad([dict(r) for r in rows]))
    trainer = Trainer(
        trainer_conf(1, monitor="val_loss", mode="min", val_check_interval=2),
        optim_conf("torch.optim.AdamW", lr=1e-2),
        precision="fp32",
        device=torch.device("cpu"),
        progress=False,
    )
    ckpts = checkpoints(ckpt_dir, keep=1, mode="min", meta={}, resume_from=resume)
    trainer.setup(FitInputs(model, nn.CrossEntropyLoss(), train, val, lambda y, p: {}), ckpts)
    trainer.fit()
    return trainer.core


def trained(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


@pytest.mark.slow
def test_packed_training_follows_padded_training_and_resumes_exactly(sources, tmp_path):
    """Without dropout, 4 packed steps train the padded run's weights (fp32, within 1e-3 after 4 AdamW steps). With
    LoRA dropout (masks drawn for a packed row: another stream than padded), a packed run killed right after the val
    check at step 2 (mid-epoch) and resumed from ``last`` ends bit-identical to the uninterrupted packed run."""
    padded = trained(fit(sources, tmp_path / "padded", packed=False, dropout=0.0))
    packed = trained(fit(sources, tmp_path / "packed", packed=True, dropout=0.0))
    # The gradients match to fp32 rounding (test above), but Adam divides by sqrt(v): where a gradient is near 0 its
    # rounding moves the element by up to ~lr, and 4 steps drift 1.1e-4 on an AVX-512 CPU (kernel-dependent)
    for name in padded:
        assert_close(packed[name], padded[name], atol=1e-3, rtol=1e-3, msg=name)
    reference = trained(fit(sources, tmp_path / "ref", packed=True, dropout=0.1))
    with pytest.raises(Killed):
        fit(sources, tmp_path / "run", packed=True, dropout=0.1, checkpoints=KilledAfterCheck)
    torch.manual_seed(123)  # whatever the RNG is now, resume restores the checkpoint's
    resumed = trained(fit(sources, tmp_path / "run", packed=True, dropout=0.1, resume=tmp_path / "run" / "last"))
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    assert not all(torch.equal(reference[k], packed[k]) for k in packed)  # dropout did change what was trained


def test_packed_logits_under_bf16_autocast(sources):
    source, tokenizer = sources["tiny_qwen2"]
    model = classifier(source, tokenizer, lora=True).eval()
    padded, packed = (dict(b) for b in both(tokenizer, features(tokenizer)))
    padded.pop("labels"), packed.pop("labels")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference, logits = model(**padded).logits, model(**packed).logits
    assert_close(logits.float(), reference.float(), atol=2e-2, rtol=2e-2)  # bf16: 8 bits of mantissa


def test_packing_keeps_weights_padded_forward_and_copies_stock(sources):
    """What checkpoints and exports see: the same parameter names and values, the padded forward unchanged, and a
    copy's forward bound to the copy (not to the original's weights)."""
    source, tokenizer = sources["tiny_qwen2"]
    torch.manual_seed(0)
    stock = source.load_model(LABELS, tokenizer).eval()
    model = classifier(source, tokenizer, lora=False).eval()
    assert stock.state_dict().keys() == model.state_dict().keys()
    padded, packed = both(tokenizer, features(tokenizer))
    padded.pop("labels"), packed.pop("labels")
    with torch.no_grad():
        assert torch.equal(model(**padded).logits, stock(**padded).logits)
        twin = copy.deepcopy(model)
        torch.nn.init.zeros_(twin.score.weight)
        assert twin(**packed).logits.abs().max() == 0 and model(**packed).logits.abs().max() > 0


def test_packing_refuses_a_model_without_a_last_token_head():
    from transformers import BertForSequenceClassification

    bert = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ConfigError, match="hardware.packing=True"):
        enable_packing(bert)


def test_packed_batches_of_ddp_shards_hold_every_record_once():
    """The sampler shards records per rank; packing each rank's micro-batches then keeps every record of the shards
    exactly once (label = record index here), its tokens intact between its ``cu_seqlens``."""
    lengths = [1 + (7 * i) % 13 for i in range(37)]
    records = [{"input_ids": [i] * n, "labels": i} for i, n in enumerate(lengths)]
    seen: list[int] = []
    for rank in range(2):
        sampler = EpochBatchSampler(lengths, 4, seed=3, rank=rank, world_size=2)
        sampler.set_epoch(2)
        for indices in sampler:
            batch = pack_records([records[i] for i in indices])
            assert batch["labels"].tolist() == indices  # the records in the sampler's order
            cu = batch["cu_seqlens"].tolist()
            for k, i in enumerate(indices):
                assert batch["input_ids"][0, cu[k] : cu[k + 1]].tolist() == records[i]["input_ids"]
            seen += indices
    # 37 records in batches of 4: 10 batches, the shards take 2 x 5 of them (none dropped), so 37 records once
    assert sorted(seen) == list(range(37))


def test_padding_share_counts_the_pads_of_padded_batches():
    assert padding_share([3, 1, 4, 4], [[0, 1], [2, 3]]) == pytest.approx(1 - 12 / 14)
    assert padding_share([3, 1, 4, 4], [[0, 1], [2, 3]], multiple=8) == pytest.approx(1 - 12 / 32)
    assert padding_share([5, 5], [[0, 1]]) == 0.0


def test_the_summary_says_what_padding_costs_and_whether_packing_left_it_out():
    out = Console(record=True, width=200)
    print_summary(run_result(padding_share={"train": 0.234, "val": 0.01}, packing=True), out)
    assert "10 samples/s on cpu, 23% of train tokens padding (packed away)" in out.export_text()
    padded = run_result(padding_share={"train": 0.234, "val": 0.01}, packing=False)
    assert padding_text(padded) == ", 23% of train tokens padding (hardware.packing=true leaves it out)"
    assert padding_text(run_result()) == ""  # no token lengths (the tabular task)
