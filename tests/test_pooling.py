"""Any HF sequence classifier, built offline: right padding, a pad token, and batched logits equal to one-by-one
logits for the shipped tiny Qwen2 and for Llama- and BERT-shaped models from a small config.json (random init and
loaded back from a local model dir); LoRA's default targets and the memory preflight follow the architecture."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import LABELS, compose_train
from peft import LoraConfig
from tokenizers import Tokenizer
from torch.testing import assert_close
from transformers import AutoModelForSequenceClassification, BertConfig, LlamaConfig, PreTrainedTokenizerFast

from loralab.data.demo import make_rows
from loralab.data.text import serialize
from loralab.errors import ConfigError
from loralab.models.build import PAD, ModelSource, read_config, shipped_config
from loralab.models.lora import apply_lora
from loralab.models.memory import check_memory

TEXTS = [serialize(r["features"]) for r in make_rows(40, seed=1)]
SMALL = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, initializer_range=0.3
)  # larger than the default 0.02, so random rows get clearly different logits
CONFIGS = {
    "llama": LlamaConfig(**SMALL, num_key_value_heads=1, max_position_embeddings=512),
    "bert": BertConfig(**SMALL, max_position_embeddings=128),
}
DEFAULT_TARGETS = {"qwen2": {"q_proj", "v_proj"}, "llama": {"q_proj", "v_proj"}, "bert": {"query", "value"}}


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory):
    """A config.json per architecture, as a user would bring for ``model.arch`` (random init)."""
    dirs = {}
    for name, config in CONFIGS.items():
        dirs[name] = tmp_path_factory.mktemp(f"{name}_config")
        config.save_pretrained(dirs[name])
    return dirs


def random_source(arch: str, arch_dirs) -> ModelSource:
    where = "tiny_qwen2" if arch == "qwen2" else str(arch_dirs[arch])
    return ModelSource(name=arch, pretrained=False, arch=where, tokenizer_vocab_size=300)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, arch_dirs):
    """Local model dirs (weights, config.json, tokenizer) as ``model.path`` reads them; the Llama tokenizer has no
    pad token, as Llama's own do not."""
    dirs = {}
    for arch in CONFIGS:
        torch.manual_seed(0)
        source = random_source(arch, arch_dirs)
        tokenizer = source.load_tokenizer(TEXTS)
        model = source.load_model(LABELS, tokenizer)
        if arch == "llama":
            tokenizer = PreTrainedTokenizerFast(
                tokenizer_object=Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()), eos_token=PAD
            )
            assert tokenizer.pad_token is None
        dirs[arch] = tmp_path_factory.mktemp(f"{arch}_model")
        model.save_pretrained(dirs[arch])
        tokenizer.save_pretrained(dirs[arch])
    return dirs


def build(arch: str, how: str, arch_dirs, model_dirs):
    torch.manual_seed(0)
    if how == "random":
        source = random_source(arch, arch_dirs)
    else:
        source = ModelSource(name=arch, path=str(model_dirs[arch]))
    tokenizer = source.load_tokenizer(TEXTS)
    return source.load_model(LABELS, tokenizer).eval(), tokenizer


CASES = [("qwen2", "random"), ("llama", "random"), ("bert", "random"), ("llama", "local"), ("bert", "local")]


@pytest.mark.parametrize(("arch", "how"), CASES, ids=[f"{a}-{h}" for a, h in CASES])
def test_batched_logits_equal_one_by_one(arch, how, arch_dirs, model_dirs):
    model, tokenizer = build(arch, how, arch_dirs, model_dirs)
    assert model.config.model_type == arch
    assert tokenizer.padding_side == "right" and tokenizer.pad_token is not None
    assert model.config.pad_token_id == tokenizer.pad_token_id is not None
    assert model.config.id2label == dict(enumerate(LABELS))
    texts = [TEXTS[0], TEXTS[1][:40], TEXTS[2][:90], "{}"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == len(texts)  # really different lengths, so really padded
    assert (batch["input_ids"][:, -1] == tokenizer.pad_token_id).sum() == len(texts) - 1  # padding on the right
    with torch.inference_mode():
        batched = model(**batch).logits
        single = torch.cat([model(**tokenizer(t, return_tensors="pt")).logits for t in texts])
    assert batched.shape == (len(texts), len(LABELS))
    assert batched.std(0).max() > 1e-2  # the rows differ: pooling reads each row, not a shared position
    assert_close(batched, single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "bert"])
def test_lora_defaults_per_architecture_and_the_preflight_counts_what_peft_trains(arch, arch_dirs):
    model, _ = build(arch, "random", arch_dirs, None)
    wrapped = apply_lora(model, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=None))  # lora=default's null
    adapted = {name.split(".")[-1] for name, module in wrapped.named_modules() if hasattr(module, "lora_A")}
    assert adapted == DEFAULT_TARGETS[arch]
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    where = "tiny_qwen2" if arch == "qwen2" else str(arch_dirs[arch])
    cfg = compose_train(
        "model=hf",
        "model.pretrained=false",
        f"model.arch={where}",
        "model.max_length=64",
        "model.tokenizer_vocab_size=300",
        "lora=default",
        "lora.r=4",
        "hardware=cpu",
    )
    est = check_memory(cfg.model, cfg.lora, cfg.hardware, num_labels=len(LABELS), batch_size=4)
    assert est.trainable_params == trainable  # adapters + head: independent of the vocabulary size


def test_preflight_reads_a_local_model_dir_config(model_dirs, capsys):
    from loralab.cli.preflight import main

    real = sum(
        p.numel()
        for p in AutoModelForSequenceClassification.from_pretrained(model_dirs["bert"], num_labels=3).parameters()
    )
    cfg = compose_train(
        "model=hf", f"model.path={model_dirs['bert']}", "model.max_length=64", "lora=none", "hardware=cpu"
    )
    assert check_memory(cfg.model, cfg.lora, cfg.hardware, num_labels=3, batch_size=4).total_params == real
    assert (
        main(
            [
                "model=hf",
                f"model.path={model_dirs['bert']}",
                "model.max_length=64",
                "hardware=cpu",
                "hardware.memory_gib=1",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("fits: hf (lora=r=8) on hardware=cpu")
    assert main(["model=hf", f"model.path={model_dirs['bert']}", "model.max_length=512"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.max_length=512: must be <= 128, the max_position_embeddings of this bert" in err


def test_unreadable_or_unknown_configs_are_one_line_config_errors(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "my_remote_arch", "auto_map": {}}')
    with pytest.raises(ConfigError, match=r"^model.path='.*': cannot read the model's config.json") as err:
        read_config(tmp_path, "model.path", trust_remote_code=False)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="model.arch='no_such_arch': not a shipped architecture name"):
        ModelSource(name="x", pretrained=False, arch="no_such_arch").architecture()


def test_a_local_architecture_json_is_read_like_a_shipped_one(tmp_path):
    """``model.arch=path/to/config.json``: the shipped tiny config with one field changed builds, its vocabulary
    filled from the tokenizer like the shipped one's; a field of the wrong type or a non-object is one line."""
    arch = shipped_config("tiny_qwen2") | {"attention_dropout": 0.1}
    (tmp_path / "tiny.json").write_text(json.dumps(arch))
    config = ModelSource(name="x", pretrained=False, arch=str(tmp_path / "tiny.json")).architecture(vocab_size=300)
    assert (config.model_type, config.attention_dropout, config.vocab_size) == ("qwen2", 0.1, 300)
    (tmp_path / "bad.json").write_text(json.dumps(arch | {"num_hidden_layers": "four"}))
    (tmp_path / "list.json").write_text("[1, 2]")
    for bad in ("bad.json", "list.json"):
        with pytest.raises(ConfigError, match=rf"^model.arch='.*{bad}': cannot read the model's config.json") as err:
            ModelSource(name="x", pretrained=False, arch=str(tmp_path / bad)).architecture()
        assert "\n" not in str(err.value)
