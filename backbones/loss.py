"""Next-token cross-entropy without a full `[tokens, vocab]` fp32 logits tensor.

The head (`lm_head`) and the loss run over chunks of tokens; each chunk is recomputed in backward
(`torch.utils.checkpoint`), so at any moment only one chunk's logits, in fp32, exist: at seq 4096 and a 32k vocabulary,
~0.5 GB per sequence (and as much again for their gradient) become `chunk_tokens x vocab x 4` bytes. The same idea as
TRL's chunked NLL and torchtune's chunked cross-entropy. The sum (not mean) over supervised tokens is returned: the
trainer divides by the global supervised-token count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of CE over positions whose label is not IGNORE_INDEX, in fp32. `labels` are already aligned to `logits`."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return cross_entropy_sum(F.linear(hidden, weight), labels)


def chunked_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              chunk_tokens: int) -> torch.Tensor:  # fmt: skip
    """`hidden` [tokens, d] and `labels` [tokens] (aligned: position t predicts labels[t]); `weight` the head's
    [vocab, d]. Chunks whose labels are all ignored are skipped (they add nothing to the loss or its gradient)."""
    total = hidden.new_zeros((), dtype=torch.float32)
    # One split (its backward concatenates the chunks' gradients once) rather than a slice per chunk (each slice's
    # backward writes into a zero-filled tensor of the whole `hidden`).
    for chunk, chunk_labels in zip(hidden.split(chunk_tokens), labels.split(chunk_tokens)):
        if not bool((chunk_labels != IGNORE_INDEX).any()):
            continue
        total = total + checkpoint(_chunk_loss, chunk, weight, chunk_labels, use_reentrant=False)
    return total


def causal_lm_loss_sum(model, labels: torch.Tensor, chunk_tokens: int, **inputs) -> torch.Tensor:
    """A `...ForCausalLM`'s loss sum (position t predicts token t + 1) with the head run chunk by chunk. Bound to the
    model as `model.chunked_loss_sum`, so that FSDP can gather the parameters around it as around a forward."""
    hidden = model.model(**inputs, use_cache=False).last_hidden_state
    return chunked_cross_entropy_sum(hidden[:, :-1].flatten(0, 1), model.lm_head.weight, labels[:, 1:].flatten(),
                                     chunk_tokens)  # fmt: skip


def causal_lm_last_token_logits(model, positions: torch.Tensor, **inputs) -> torch.Tensor:
    """fp32 logits [len(positions), vocab] at `positions` of the flattened batch (each sequence's last token, when
    decoding): the head runs on those rows only, never on the whole [tokens, vocab]. Bound to the model as
    `model.last_token_logits`, an FSDP forward method like `chunked_loss_sum`."""
    hidden = model.model(**inputs, use_cache=False).last_hidden_state.flatten(0, 1)[positions]
    return model.lm_head(hidden).float()
