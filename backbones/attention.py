"""PyTorch's own FlashAttention-2 varlen kernel (`torch.nn.attention.varlen.varlen_attn`, torch >= 2.11, CUDA) as a
transformers attention implementation, so that flash attention needs no flash-attn build.

Registered as `torch_varlen` in transformers' AttentionInterface (and, for mask creation, as a flash-style
implementation). It takes the padding-free batches that transformers' `flash_attention_2` takes: one flattened row with
`cu_seq_lens_q/k` and `max_length_q/k` (the keys of `DataCollatorWithFlattening(return_flash_attn_kwargs=True)`), so
attention stays within each example. Without those keys each row is one sequence, or right padding is removed using
the 2-D attention mask.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

TORCH_VARLEN = "torch_varlen"


def torch_varlen_kernel() -> Callable | None:
    """torch's varlen kernel, looked up at call time (tests present it in another torch's signature)."""
    try:
        from torch.nn.attention import varlen
    except ImportError:  # torch < 2.10 (shardtune needs 2.11)
        return None
    return getattr(varlen, "varlen_attn", None)


def causal_kwargs(kernel: Callable, heads_q: int, heads_kv: int) -> tuple[dict, bool]:
    """Keyword arguments that make `kernel` causal for the signature this torch has, and whether K/V must be repeated
    for grouped-query heads. torch 2.11+ take `window_size`, whose default (-1, -1) is NOT causal: causal is the tuple
    (-1, 0) (torch compares with `==`, so a list would silently mean non-causal). torch 2.11 has no `enable_gqa`: its
    kernel then gets K/V repeated to the query heads; 2.13 takes the grouped heads as they are."""
    params = inspect.signature(kernel).parameters
    if "window_size" not in params:
        raise RuntimeError(f"unsupported varlen_attn signature {inspect.signature(kernel)}: no window_size "
                           "(shardtune needs torch >= 2.11)")  # fmt: skip
    kwargs: dict = {"window_size": (-1, 0)}
    repeat_kv = heads_q != heads_kv and "enable_gqa" not in params
    if heads_q != heads_kv and not repeat_kv:
        kwargs["enable_gqa"] = True
    return kwargs, repeat_kv


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: q/k/v are [batch, heads, tokens, head_dim]; returns
    [batch, tokens, heads, head_dim]."""
    kernel = torch_varlen_kernel()
    if kernel is None:
        raise RuntimeError("attn_implementation=torch_varlen needs torch >= 2.11 (torch.nn.attention.varlen)")
    if dropout:
        raise ValueError(f"torch_varlen attention has no dropout (got {dropout}); use sdpa for attention dropout")
    batch, heads_q, q_len, head_dim = query.shape
    heads_kv, kv_len = key.shape[1], key.shape[2]
    if q_len != kv_len:
        raise NotImplementedError("torch_varlen attention is for training (no KV cache); generate with sdpa")
    causal = module.is_causal if is_causal is None else is_causal
    kernel_kwargs, repeat_kv = causal_kwargs(kernel, heads_q, heads_kv)
    if not causal:
        kernel_kwargs.pop("window_size")
    # The kernel takes [total tokens, heads, head_dim].
    q, k, v = (x.transpose(1, 2).reshape(batch * q_len, x.shape[1], head_dim) for x in (query, key, value))
    if repeat_kv:
        k, v = (x.repeat_interleave(heads_q // heads_kv, dim=1) for x in (k, v))
    indices = None
    if cu_seq_lens_q is None:
        if attention_mask is not None:  # right-padded rows: keep only real tokens
            mask = attention_mask.bool()
            lengths = mask.sum(-1, dtype=torch.int32)
            indices = mask.flatten().nonzero().squeeze(1)
            q, k, v = q[indices], k[indices], v[indices]
        else:  # every row is one whole sequence
            lengths = torch.full((batch,), q_len, dtype=torch.int32, device=query.device)
        cu_seq_lens_q = cu_seq_lens_k = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        max_length_q = max_length_k = int(lengths.max())
    out = kernel(
        q,
        k,
        v,
        cu_seq_lens_q.to(torch.int32),
        cu_seq_lens_k.to(torch.int32),
        int(max_length_q),
        int(max_length_k),
        scale=scaling,
        **kernel_kwargs,
    )
    if indices is not None:
        out = out.new_zeros(batch * q_len, heads_q, head_dim).index_copy(0, indices, out)
    return out.view(batch, q_len, heads_q, head_dim), None


AttentionInterface.register(TORCH_VARLEN, varlen_attention_forward)
# Mask creation as for flash_attention_2: None, or the 2-D padding mask (never a 4-D mask).
ALL_MASK_ATTENTION_FUNCTIONS.register(TORCH_VARLEN, flash_attention_mask)
