"""The pretrain stage of the lifecycle (``conf/pretrain``): between a task's data and its model, it may replace the
task's base with one it trained as a causal LM on the run's unlabelled texts.

Why: adapters steer features a base already has, and a few epochs of next-token prediction on the training texts
give a base features of the records. On a real Qwen2.5 this is domain-adaptive pretraining. On the offline demo it
is the two-stage path real runs take, but measured it does not beat LoRA on the random base (README).

``none`` returns the base unchanged. ``clm`` trains with ``core.Trainer`` (the run's own trainer: checkpoints,
exact resume, SIGTERM handling) and caches the result as a plain Hugging Face directory (safetensors + tokenizer)
under ``pretrain.cache_dir``, named by a hash of everything that changes it. A sweep or a rerun pretrains once:
jobs wanting the same base wait on a file lock for the first, a finished base appears in one atomic rename, and a
run killed while pretraining leaves its checkpoints beside the cache, where the next run resumes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import secrets
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from filelock import FileLock
from transformers import DataCollatorWithPadding, set_seed

from loralab.config.schema import PretrainConf
from loralab.core.checkpoint import Checkpoints, read_model_meta, rng_state, save_checkpoint, set_rng_state
from loralab.core.loaders import TaskData, make_loaders
from loralab.core.trainer import FitInputs, Trainer
from loralab.data.text import TokenizedTexts, tokenizer_fingerprint
from loralab.errors import CheckpointError, DataError
from loralab.fs import recover
from loralab.models.build import ModelSource, enable_activation_checkpointing
from loralab.models.pretrain import MeanTokenNLL, TokenNLL

log = logging.getLogger(__name__)

FORMAT = 2  # part of every cache key: bump it when the stage's training (or the entry's layout) changes in a way
# the settings do not show

Texts = Callable[[Sequence[str], Sequence[str]], list[str]]  # (splits, extra files) -> unlabelled texts


class PretrainStage:
    """The stage's interface: ``base`` returns the source the task's model loads. Built on the run's typed
    ``pretrain`` group (``conf/pretrain``; ``none`` keeps ``clm``'s keys, so ``pretrain=clm`` finds them)."""

    def __init__(self, conf: PretrainConf):
        self.conf = conf

    @property
    def name(self) -> str:
        return str(self.conf.name)

    def base(self, source: ModelSource | None, tokenizer, texts: Texts, **run: Any) -> ModelSource | None:
        """The source the task's model loads. ``run`` is what a stage that trains needs: ``seed``, ``device``,
        ``hardware`` (the run's group), ``tracker``, ``stop_requested``, ``progress``."""
        return source


class NoPretrain(PretrainStage):
    """``pretrain=none``: the base as ``model=...`` names it."""


class CausalLMPretrain(PretrainStage):
    """``pretrain=clm``: continued causal-LM pretraining of the base, cached."""

    def settings(self) -> dict[str, Any]:
        """What, besides texts, tokenizer, base and seed, changes the result (so it is in the cache key). A key
        left at what older versions hard-coded stays out, so their cached bases keep their keys."""
        c = self.conf
        keys = ("epochs", "lr", "batch_size", "weight_decay", "warmup_ratio", "holdout", "train")
        out = {k: str(getattr(c, k)) if k == "train" else getattr(c, k) for k in keys}
        if c.train == "lora":
            out["lora"] = {**vars(c.lora), "target_modules": list(c.lora.target_modules)}
        if c.min_steps:
            out["min_steps"] = c.min_steps
        if c.max_steps:
            out["max_steps"] = c.max_steps
        optimizer = {k: v for k, v in vars(c.optimizer).items() if k not in ("_partial_", "lr", "weight_decay")}
        if optimizer != {"_target_": "torch.optim.AdamW"}:
            out["optimizer"] = optimizer
        if c.scheduler != "cosine":
            out["scheduler"] = c.scheduler
        if c.max_grad_norm != 1.0:
            out["max_grad_norm"] = c.max_grad_norm
        return out

    def key(self, source: ModelSource, tokenizer, texts: Sequence[str], seed: int, precision: str) -> str:
        digest = hashlib.sha256()
        for text in texts:
            digest.update(text.encode() + b"\0")
        parts = {
            "format": FORMAT,
            "stage": self.name,
            "texts": digest.hexdigest(),
            "n_texts": len(texts),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "base": source.identity(),
            "max_length": source.max_length,
            "settings": self.settings(),
            "seed": seed,
            "precision": precision,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def base(self, source: ModelSource | None, tokenizer, texts: Texts, **run: Any) -> ModelSource | None:
        c = self.conf
        corpus = texts(list(c.splits), list(c.extra_files))
        if "val" in c.splits:
            log.warning(
                "pretrain.splits includes val: the base has read the val texts, so val metrics are "
                "optimistic (transductive)"
            )
        if len(corpus) < 2:
            raise DataError(
                f"pretrain={self.name}: {len(corpus)} text(s) to pretrain on; it needs at least 2 (one is held out)"
            )
        hw = run["hardware"]
        key = self.key(source, tokenizer, corpus, run["seed"], str(hw.precision))
        cache = Path(c.cache_dir)
        final = cache / f"{source.name}-{key}"
        cache.mkdir(parents=True, exist_ok=True)
        # Sweep jobs asking for the same base wait here for the first; the OS drops the lock if its holder dies.
        with FileLock(cache / f"{final.name}.lock"):
            recover(final)
            info = verified_entry(final)
            hit = info is not None
            if hit:
                log.info("pretrain=%s: cache hit %s (%s)", self.name, key, final)
            else:
                log.info(
                    "pretrain=%s: cache miss %s: %d epochs of causal-LM training on %d texts -> %s",
                    self.name,
                    key,
                    c.epochs,
                    len(corpus),
                    final,
                )
                info = self._pretrain(source, tokenizer, corpus, final, key, **run)
        tracker = run["tracker"]
        tracker.set_tags({"pretrain.cache_key": key, "pretrain.cache_hit": hit, "pretrain.base_dir": str(final)})
        for epoch in info["history"] if hit else []:  # a miss logged them as they came
            tracker.log_metrics(lm_metrics(epoch), step=epoch["epoch"])
        log.info(
            "pretrain=%s: base %s, LM loss by epoch %s (held out %s)",
            self.name,
            key,
            [round(h["train_loss"], 4) for h in info["history"]],
            [round(h["val_loss"], 4) for h in info["history"]],
        )
        return replace(source, path=str(final), pretrained=True, pretrain_key=key)

    def _pretrain(
        self,
        source: ModelSource,
        tokenizer,
        texts: list[str],
        final: Path,
        key: str,
        *,
        seed: int,
        device: torch.device,
        hardware,
        tracker,
        stop_requested: Callable[[], bool],
        progress: bool,
    ) -> dict[str, Any]:
        """Train, save ``final`` atomically, drop the work dir. Leaves the global RNG as it found it, so a run that
        hits the cache fine-tunes exactly like the run that filled it."""
        c, work = self.conf, final.with_name(final.name + ".partial")
        outer_rng = rng_state()
        try:
            set_seed(seed)
            lm = source.load_causal_lm(tokenizer, attn_implementation=hardware.attn_implementation)
            if hardware.gradient_checkpointing:
                enable_activation_checkpointing(lm)
            if c.train == "lora":
                # peft (~2 s of CPU to import) loads only when a stage trains LoRA, not with every run of the recipe
                from peft import LoraConfig, get_peft_model

                lm = get_peft_model(lm, LoraConfig(task_type="CAUSAL_LM", **vars(c.lora)))
            model = TokenNLL(lm).to(device)
            train_texts, held_out = holdout_split(texts, c.holdout, seed)
            data = TaskData(
                *(lm_dataset(t, tokenizer, source.max_length) for t in (train_texts, held_out)),
                collate=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8),
            )
            data.train_lengths, data.val_lengths = data.train.lengths, data.val.lengths
            train_loader, val_loader, accum = make_loaders(
                data, batch_size=c.batch_size, hardware=hardware, trainer=c.trainer(1), seed=seed
            )
            trainer_conf = c.trainer(-(-len(train_loader) // accum))
            if trainer_conf.max_epochs != c.epochs:
                log.info(
                    "pretrain=%s: %d epochs to reach pretrain.min_steps=%d",
                    self.name,
                    trainer_conf.max_epochs,
                    c.min_steps,
                )
            last = work / "checkpoints" / "last"
            recover(last)
            resume = last if last.is_dir() else None
            if resume is not None:
                log.info("pretrain=%s: resuming the interrupted pretraining from %s", self.name, resume)
            trainer = Trainer(
                trainer_conf, c.optim(), precision=str(hardware.precision), device=device, progress=progress
            )
            trainer.setup(
                FitInputs(model, MeanTokenNLL(), train_loader, val_loader, perplexity, accum),
                Checkpoints(work / "checkpoints", keep=1, mode="min", meta={"pretrain_key": key}, resume_from=resume),
            )
            state = trainer.fit(
                on_epoch_end=lambda st, m: tracker.log_metrics(lm_metrics(m), step=st.epoch),
                stop_requested=stop_requested,
            )
            trainer.finish()  # the epoch with the lowest held-out LM loss
            lm = model.lm.merge_and_unload() if c.train == "lora" else model.lm
            info = {
                "key": key,
                "stage": self.name,
                "settings": self.settings(),
                "seed": seed,
                "texts": len(texts),
                "held_out": len(held_out),
                "best_epoch": state.best_epoch,
                "history": [
                    {k: h[k] for k in ("epoch", "train_loss", "val_loss", "val_perplexity", "epoch_train_time_s")}
                    for h in state.history
                ],
            }
            save_checkpoint(final, lm.to("cpu"), tokenizer, info)  # its manifest is checked on every hit
            shutil.rmtree(work, ignore_errors=True)
            return info
        finally:
            set_rng_state(outer_rng)


def verified_entry(entry: Path) -> dict[str, Any] | None:
    """The entry's meta (``loralab_checkpoint.json``: key, settings, history) when every file matches the
    manifest written with it; None when there is no entry. A cache may be shared (``LORALAB_CACHE``) and outlives
    runs, so an entry that is unreadable, altered or written without a manifest (by an older loralab) is never used:
    it is moved aside as ``<entry>.rejected-<time>`` (kept to inspect), a warning names it and why, and the caller
    pretrains the base again (the key fixes every input, so the rebuilt base is the one the entry should have
    held)."""
    if not entry.is_dir():
        return None
    try:
        return read_model_meta(entry)
    except CheckpointError as err:
        problem = str(err).removeprefix(f"{entry}: ").removesuffix("; refusing to load it")
    rejected = entry.with_name(f"{entry.name}.rejected-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}")
    entry.rename(rejected)
    log.warning("pretrain cache entry %s rejected: %s; moved to %s, pretraining it again", entry, problem, rejected)
    return None


def perplexity(y, outputs) -> dict[str, float]:
    """exp(mean NLL per token) of the held-out texts: the epoch metric pretraining keeps its best epoch by."""
    return {"val_perplexity": math.exp(outputs[:, 0].sum() / max(outputs[:, 1].sum(), 1.0))}


def lm_metrics(epoch: dict[str, float]) -> dict[str, float]:
    """An epoch of pretraining as MLflow metrics: LM loss on the trained texts and on the held-out ones."""
    return {
        "pretrain.lm_loss": epoch["train_loss"],
        "pretrain.val_lm_loss": epoch["val_loss"],
        "pretrain.val_perplexity": epoch["val_perplexity"],
    }


def holdout_split(texts: Sequence[str], share: float, seed: int) -> tuple[list[str], list[str]]:
    """(texts to train on, texts held out to measure LM loss each epoch): a seed-fixed ``share``, at least one."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(share * len(texts))) if len(texts) > 1 else 0
    held = set(order[:n_held])
    return [t for i, t in enumerate(texts) if i not in held], [t for i, t in enumerate(texts) if i in held]


def lm_dataset(texts: Sequence[str], tokenizer, max_length: int) -> TokenizedTexts:
    """Texts as their own targets; the trainer's per-row label is a placeholder it only counts."""
    return TokenizedTexts(texts, list(range(len(texts))), [0] * len(texts), tokenizer, max_length)
