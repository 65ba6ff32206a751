"""Padding-free packing for a decoder's sequence classifier (``hardware.packing``).

transformers packs causal LMs (``DataCollatorWithFlattening``) but not ``*ForSequenceClassification``: its head pools
the last non-pad token of each row, so a row holding several records would give one logit row. Here the collate
(``core.loaders.pack_records``) puts a micro-batch's records in one row, position ids restarting at 0 per record,
with ``cu_seqlens`` (record boundaries, as flash-attention's varlen kernels name them), and the classifier's forward
reads that:

- the backbone runs with packed ``position_ids`` and no attention mask: transformers (5.x) then keeps records apart
  itself, a block-diagonal causal mask for sdpa/eager/flex (``masking_utils.find_packed_sequence_indices``: a new
  record wherever the position does not go up by 1) and the varlen kernel for flash-attention;
- each record's last token (``cu_seqlens[1:] - 1``) goes through the ``score`` head, as the padded path's last
  non-pad token does.

The forward is installed on the transformers classifier itself (an instance attribute, so no parameter is renamed:
checkpoints, exports and the padded forward are the stock ones), under whatever wraps it: peft's LoRA model passes
the extra keyword through, DDP and ``compile`` call ``forward``, activation checkpointing sits inside the backbone.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

from loralab.errors import ConfigError


def enable_packing(model: Any) -> None:
    """Let ``model`` (a transformers decoder classifier, before LoRA wraps it) score packed batches: a call with
    ``cu_seqlens`` runs packed, any other call runs the stock forward."""
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(getattr(model, "score", None), torch.nn.Module) or backbone is None:
        raise ConfigError(
            f"hardware.packing=True: needs a decoder classifier that scores its last token (a `score` head over "
            f"a causal backbone); {type(model).__name__} has none, so leave packing off"
        )
    model.forward = types.MethodType(_forward, model)  # a bound method: deepcopy rebinds it to the copy


def _forward(
    self: Any,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    **kwargs: Any,
) -> SequenceClassifierOutputWithPast:
    if cu_seqlens is None:
        return type(self).forward(
            self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )
    kwargs = {k: v for k, v in kwargs.items() if v is not None}  # peft passes labels=None, return_dict=None...
    if attention_mask is not None or input_ids is None or position_ids is None or "labels" in kwargs:
        raise ValueError("a packed batch is input_ids, position_ids and cu_seqlens (no attention_mask, no labels)")
    kwargs.pop("return_dict", None)
    return packed_logits(self, input_ids, position_ids, cu_seqlens, **kwargs)


def packed_logits(
    model: Any, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor, **kwargs: Any
) -> SequenceClassifierOutputWithPast:
    """Logits (records, labels) of a packed batch: one row of concatenated records; ``cu_seqlens`` (records + 1)
    their cumulative lengths from 0."""
    if input_ids.shape[0] != 1 or position_ids.shape != input_ids.shape:
        raise ValueError(f"a packed batch is one row; got input_ids {tuple(input_ids.shape)}")
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False, **kwargs).last_hidden_state
    last = hidden[0, cu_seqlens[1:].long() - 1]  # each record's last token, as the padded path's last non-pad one
    return SequenceClassifierOutputWithPast(logits=model.score(last))
