"""Tokenizer and sequence-classification model from a ``conf/model`` entry: any architecture transformers has a
``*ForSequenceClassification`` for (Qwen2/3, Llama, Mistral, BERT-family encoders...).

Real checkpoints load by hub id or local path. ``pretrained=false`` builds an architecture with random weights from
a config shipped in this package (or a local config.json), and trains a byte-level BPE tokenizer on the run's own
texts, so tests, benchmarks and the demo need no network. The pretrain stage (``loralab.pretrain``) turns a source
into one whose ``path`` is a base it pretrained and cached here (``pretrain_key`` set).

Pooling is the architecture's own: decoders score the last non-pad token (found through ``config.pad_token_id``,
set from the tokenizer, whose pad token is its eos token when it has none), encoders their first ([CLS]) token.
Padding is on the right for both, so batched logits equal one-by-one logits (tested for Qwen2, Llama and BERT).
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch
from huggingface_hub.errors import StrictDataclassError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from loralab.errors import ConfigError

log = logging.getLogger(__name__)

HEAD_MODULES = {"score", "classifier"}  # the sequence-classification heads transformers adds
PAD = "<|endoftext|>"  # Qwen's own pad token, reused by the trained tokenizer


def shipped_config(name: str) -> dict:
    """Architecture JSON shipped in ``loralab/models/configs`` (no hub access)."""
    path = resources.files("loralab.models") / "configs" / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no shipped architecture config named {name!r} ({path})")
    return json.loads(path.read_text())


def _unreadable(key: str, location: str | Path, err: Exception) -> ConfigError:
    first = (str(err).splitlines() or [type(err).__name__])[0]
    return ConfigError(f"{key}={str(location)!r}: cannot read the model's config.json ({first})")


def read_json(location: str | Path, key: str) -> dict:
    """A bare config.json as a dict; ConfigError (one line, naming ``key``) when it is not a JSON object."""
    try:
        config = json.loads(Path(location).read_text())
    except (OSError, ValueError) as err:
        raise _unreadable(key, location, err) from None
    if not isinstance(config, dict):
        raise _unreadable(key, location, TypeError("not a JSON object"))
    return config


def config_from_dict(config: dict, location: str | Path, key: str) -> PretrainedConfig:
    """``AutoConfig.for_model`` of a config.json's fields; a missing ``model_type`` or a field of the wrong type is
    one ConfigError line naming ``key``."""
    try:
        return AutoConfig.for_model(**config)
    except (ValueError, KeyError, TypeError, StrictDataclassError) as err:
        raise _unreadable(key, location, err) from None


def read_config(location: str | Path, key: str, trust_remote_code: bool, local_only: bool = False) -> PretrainedConfig:
    """``AutoConfig`` of a local dir / config.json or a hub id (``local_only``: from the HF cache, no network);
    ConfigError (one line, naming ``key``) when it cannot be read."""
    if Path(location).is_file():  # a bare config.json
        return config_from_dict(read_json(location, key), location, key)
    try:
        return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code, local_files_only=local_only)
    except (OSError, ValueError, KeyError, StrictDataclassError) as err:
        raise _unreadable(key, location, err) from None


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with every digit its own token, so numbers are read digit by digit, not memorised."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=PAD)


def quantization_4bit(compute_dtype: torch.dtype | None):
    """QLoRA's NF4 base weights. bitsandbytes is CUDA-only and optional, hence the late import."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "hardware.load_in_4bit=true needs bitsandbytes on a CUDA machine: pip install loralab[gpu]"
        ) from err
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype or torch.bfloat16,
    )


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

    def architecture(self, vocab_size: int | None = None) -> PretrainedConfig:
        """The model's config, read before any weights load (preflight, random init). A local ``path``: its
        config.json. A ``hub_id``: from the HF cache; when it is not cached, the shipped config named by ``arch``
        (Qwen2.5's match the hub's), else config.json alone is downloaded. ``pretrained=false``: ``arch``, a
        shipped name or a local config.json / model dir; a shipped config without a vocabulary size gets
        ``vocab_size`` (the trained tokenizer's), else ``tokenizer_vocab_size``."""
        if not self.pretrained:
            name = self.arch or self.name
            if Path(name).is_dir():
                return read_config(name, "model.arch", self.trust_remote_code)
            try:
                arch = read_json(name, "model.arch") if Path(name).is_file() else shipped_config(name)
            except FileNotFoundError as err:
                raise ConfigError(
                    f"model.arch={name!r}: not a shipped architecture name nor a local config.json or model dir ({err})"
                ) from None
            arch["vocab_size"] = arch.get("vocab_size") or vocab_size or self.tokenizer_vocab_size
            return config_from_dict(arch, name, "model.arch")
        if self.path:
            return read_config(self.path, "model.path", self.trust_remote_code)
        if not self.hub_id:
            raise ConfigError("model.hub_id=None: pretrained=true needs model.hub_id or model.path")
        try:
            return read_config(self.hub_id, "model.hub_id", self.trust_remote_code, local_only=True)
        except ConfigError:
            if self.arch:
                return AutoConfig.for_model(**shipped_config(self.arch))
            return read_config(self.hub_id, "model.hub_id", self.trust_remote_code)

    @property
    def local_base(self) -> bool:
        """The base exists only on this machine (random init, or pretrained here): an export must carry it."""
        return not self.pretrained or self.pretrain_key is not None

    def identity(self) -> dict:
        """What the base's weights start from: the architecture (random init) or the checkpoint's location."""
        if self.pretrained:
            return {"location": self.location}
        config = self.architecture().to_diff_dict()
        config.pop("transformers_version", None)
        return {"arch": config}

    def random_config(self, tokenizer, **label_map) -> PretrainedConfig:
        """The architecture, its vocabulary grown to the tokenizer's."""
        config = self.architecture(vocab_size=len(tokenizer))
        config.vocab_size = max(config.vocab_size or 0, len(tokenizer))
        config.update(label_map)
        return config

    def load_causal_lm(self, tokenizer, attn_implementation: str = "sdpa") -> PreTrainedModel:
        """The base as a causal LM (fp32), for continued pretraining on unlabelled texts."""
        if self.pretrained:
            model = AutoModelForCausalLM.from_pretrained(
                self.location,
                attn_implementation=attn_implementation,
                dtype=torch.float32,
                trust_remote_code=self.trust_remote_code,
            )
        else:
            config = self.random_config(tokenizer, pad_token_id=tokenizer.pad_token_id)
            config._attn_implementation = attn_implementation
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
        return model

    def load_tokenizer(self, texts: Sequence[str]) -> PreTrainedTokenizerFast:
        if self.pretrained:
            tok = AutoTokenizer.from_pretrained(self.location, trust_remote_code=self.trust_remote_code)
            if tok.pad_token is None:  # decoder tokenizers (Llama, Mistral) often have none; eos is the convention
                if tok.eos_token is None:
                    key = "model.path" if self.path else "model.hub_id"
                    raise ConfigError(
                        f"{key}={self.location!r}: the tokenizer has neither a pad nor an eos token to pad batches with"
                    )
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

    def load_model(
        self,
        labels: Sequence[str],
        tokenizer,
        attn_implementation: str = "sdpa",
        dtype: torch.dtype = torch.float32,
        load_in_4bit: bool = False,
        compute_dtype: torch.dtype | None = None,
    ) -> PreTrainedModel:
        label_map = dict(
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            problem_type="single_label_classification",
            pad_token_id=tokenizer.pad_token_id,
        )
        kwargs = {"quantization_config": quantization_4bit(compute_dtype)} if load_in_4bit else {}
        if load_in_4bit and not self.pretrained:
            raise ValueError(
                "hardware.load_in_4bit=true needs model.pretrained=true (random weights are not quantized)"
            )
        if self.pretrained:
            with _quiet_load_report():
                model, info = AutoModelForSequenceClassification.from_pretrained(
                    self.location,
                    attn_implementation=attn_implementation,
                    dtype=dtype,
                    output_loading_info=True,
                    trust_remote_code=self.trust_remote_code,
                    **label_map,
                    **kwargs,
                )
            _log_loading_info(info, self.location)
            if load_in_4bit:
                from peft import prepare_model_for_kbit_training

                model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        else:
            config = self.random_config(tokenizer, **label_map)
            config._attn_implementation = attn_implementation
            model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
        model.config.pad_token_id = tokenizer.pad_token_id
        return model


@contextmanager
def _quiet_load_report():
    """transformers logs a WARNING table for every missing key; the classifier head of a base checkpoint is always
    missing (it is new for this label set), so ``_log_loading_info`` reports that and warns only about the rest.

    A filter, not a level: transformers 5 runs an extra tensor-parallel check (more warnings) when its logger's
    level is raised to WARNING or above."""
    hf_log = logging.getLogger("transformers.modeling_utils")
    drop_report = lambda record: "LOAD REPORT" not in record.getMessage()  # noqa: E731
    hf_log.addFilter(drop_report)
    try:
        yield
    finally:
        hf_log.removeFilter(drop_report)


def _log_loading_info(info: dict, location: str) -> None:
    missing = list(info.get("missing_keys", ()))
    body = [key for key in missing if key.split(".")[0] not in HEAD_MODULES]
    if len(body) < len(missing):
        log.info(
            "classifier head %s is new (initialized for this label set)",
            sorted({key.split(".")[0] for key in missing if key not in body}),
        )
    if body:
        log.warning(
            "%d weights missing from %s were initialized at random: %s",
            len(body),
            location,
            ", ".join(sorted(body)[:8]) + (" ..." if len(body) > 8 else ""),
        )
    if info.get("unexpected_keys"):
        log.info(
            "%d weights of %s are not used by the classifier (e.g. a language-model head)",
            len(info["unexpected_keys"]),
            location,
        )


def enable_activation_checkpointing(model) -> None:
    """Recompute activations in backward instead of keeping them (``hardware.gradient_checkpointing``): much less
    activation memory for about a third more compute. Non-reentrant, as peft's adapters on a frozen base need.
    transformers 5 names it ``activation_checkpointing_enable``; its older name warns, and older 5.x lack the new."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
