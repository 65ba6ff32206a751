"""Tokenizer and sequence-classification model from a ``conf/model`` entry.

Real checkpoints load by hub id or local path. ``pretrained=false`` builds the same architecture with random
weights from a config shipped in this package, and trains a byte-level BPE tokenizer on the run's own texts, so
tests, benchmarks and the demo need no network. The pretrain stage (``loralab.pretrain``) turns a source into one
whose ``path`` is a base it pretrained and cached here (``pretrain_key`` set).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from importlib import resources
from typing import Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

log = logging.getLogger(__name__)

PAD = "<|endoftext|>"  # Qwen's own pad token, reused by the trained tokenizer


def shipped_config(name: str) -> dict:
    """Architecture JSON shipped in ``loralab/models/configs`` (no hub access)."""
    path = resources.files("loralab.models") / "configs" / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no shipped architecture config named {name!r} ({path})")
    return json.loads(path.read_text())


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with every digit its own token, so numbers are read digit by digit, not memorised."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=PAD)


def quantization_4bit(compute_dtype: torch.dtype | None):
    """QLoRA's NF4 base weights. bitsandbytes is CUDA-only and optional, hence the late import."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ImportError("hardware.load_in_4bit=true needs bitsandbytes on a CUDA machine: "
                          "pip install bitsandbytes") from err
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype or torch.bfloat16)


@dataclass
class ModelSource:
    """Where weights and tokenizer come from. Built by Hydra from ``conf/model/*.yaml``."""

    name: str
    hub_id: str | None = None
    path: str | None = None
    pretrained: bool = True
    arch: str | None = None
    max_length: int = 256
    truncation_side: str = "right"
    tokenizer_vocab_size: int = 2048
    trust_remote_code: bool = False
    pretrain_key: str | None = None  # set by the pretrain stage: ``path`` is a base pretrained (and cached) here

    @property
    def location(self) -> str | None:
        return self.path or self.hub_id

    @property
    def local_base(self) -> bool:
        """The base exists only on this machine (random init, or pretrained here): an export must carry it."""
        return not self.pretrained or self.pretrain_key is not None

    def identity(self) -> dict:
        """What the base's weights start from: the shipped architecture (random init) or the checkpoint's location."""
        if self.pretrained:
            return {"location": self.location}
        return {"arch": shipped_config(self.arch or self.name)}

    def random_config(self, tokenizer, **label_map):
        """The shipped architecture, its vocabulary grown to the tokenizer's."""
        arch = shipped_config(self.arch or self.name)
        arch["vocab_size"] = max(arch.get("vocab_size") or 0, len(tokenizer))
        return AutoConfig.for_model(**arch, **label_map)

    def load_causal_lm(self, tokenizer, attn_implementation: str = "sdpa") -> PreTrainedModel:
        """The base as a causal LM (fp32), for continued pretraining on unlabelled texts."""
        if self.pretrained:
            model = AutoModelForCausalLM.from_pretrained(self.location, attn_implementation=attn_implementation,
                                                         dtype=torch.float32, trust_remote_code=self.trust_remote_code)
        else:
            config = self.random_config(tokenizer, pad_token_id=tokenizer.pad_token_id)
            config._attn_implementation = attn_implementation
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
        return model

    def load_tokenizer(self, texts: Sequence[str]) -> PreTrainedTokenizerFast:
        if self.pretrained:
            tok = AutoTokenizer.from_pretrained(self.location, trust_remote_code=self.trust_remote_code)
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
        else:
            tok = train_tokenizer(texts, self.tokenizer_vocab_size)
        return self.configure(tok)

    def tokenizer_from_json(self, spec: str) -> PreTrainedTokenizerFast:
        """A trained tokenizer received from another process (DDP rank 0)."""
        return self.configure(wrap_tokenizer(Tokenizer.from_str(spec)))

    def configure(self, tok):
        """Padding and truncation sides (saved tokenizers do not always keep them)."""
        # Right padding: causal attention never lets pads touch real tokens, and Qwen2's classifier pools the
        # last non-pad token, so batched logits equal one-by-one logits (tested).
        tok.padding_side = "right"
        tok.truncation_side = self.truncation_side
        return tok

    def load_model(self, labels: Sequence[str], tokenizer, attn_implementation: str = "sdpa",
                   dtype: torch.dtype = torch.float32, load_in_4bit: bool = False,
                   compute_dtype: torch.dtype | None = None) -> PreTrainedModel:
        label_map = dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                         label2id={label: i for i, label in enumerate(labels)},
                         problem_type="single_label_classification", pad_token_id=tokenizer.pad_token_id)
        kwargs = {"quantization_config": quantization_4bit(compute_dtype)} if load_in_4bit else {}
        if load_in_4bit and not self.pretrained:
            raise ValueError("hardware.load_in_4bit=true needs model.pretrained=true (random weights are not quantized)")
        if self.pretrained:
            model = AutoModelForSequenceClassification.from_pretrained(
                self.location, attn_implementation=attn_implementation, dtype=dtype,
                trust_remote_code=self.trust_remote_code, **label_map, **kwargs)
            if load_in_4bit:
                from peft import prepare_model_for_kbit_training

                model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        else:
            config = self.random_config(tokenizer, **label_map)
            config._attn_implementation = attn_implementation
            model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
        model.config.pad_token_id = tokenizer.pad_token_id
        return model
