"""Exact torch stand-ins for the two CUDA flash kernels, so that CPU tests run the real dispatch around them.

Only the kernels are replaced: flash-attn's `flash_attn_func` / `flash_attn_varlen_func` (a fake `flash_attn`
package, with transformers told that it is available) and `torch.nn.attention.varlen.varlen_attn`. transformers'
attention dispatch, mask creation and unpadding, and shardtune's batching and varlen adapter all run as on a GPU.
Each stand-in computes every sequence alone with SDPA's math, honouring the real kernels' arguments (causal flags,
window sizes, grouped-query heads), and counts its calls so a test can prove it ran.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from collections import Counter

import torch
import torch.nn.functional as F

CALLS: Counter = Counter()


def _attend(q, k, v, cu_q, cu_k, causal: bool, scale: float | None) -> torch.Tensor:
    """q/k/v: [total tokens, heads, dim] (k/v may have fewer heads); each cu-delimited sequence attends to itself."""
    if k.shape[1] != q.shape[1]:
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    out = torch.empty_like(q)
    for i in range(len(cu_q) - 1):
        qa, qb, ka, kb = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        if qb == qa:
            continue
        qs, ks, vs = (x.transpose(0, 1)[None] for x in (q[qa:qb], k[ka:kb], v[ka:kb]))
        out[qa:qb] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale)[0].transpose(0, 1)
    return out


# ---- flash-attn 2.x API (signatures as in flash_attn/flash_attn_interface.py: transformers inspects them) ----
def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    CALLS["flash_attn_varlen_func"] += 1
    assert tuple(window_size) == (-1, -1) and not softcap and alibi_slopes is None and dropout_p == 0.0
    return _attend(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale)


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """[batch, tokens, heads, dim]: every row one sequence (plain causal rows, as the real kernel does)."""
    CALLS["flash_attn_func"] += 1
    batch, q_len = q.shape[:2]
    cu = torch.arange(batch + 1) * q_len
    flat = _attend(
        q.flatten(0, 1),
        k.flatten(0, 1),
        v.flatten(0, 1),
        cu,
        torch.arange(batch + 1) * k.shape[1],
        causal,
        softmax_scale,
    )
    return flat.view_as(q)


def flash_attn_with_kvcache(*args, **kwargs):
    raise NotImplementedError("the stand-in has no KV-cache kernel")


def install_flash_attn(monkeypatch) -> None:
    """A fake `flash_attn` package with the stand-in kernels, and transformers told that FlashAttention-2 is usable."""
    from transformers import modeling_flash_attention_utils as fa_utils
    from transformers.modeling_flash_attention_utils import _pad_input, _unpad_input

    package = types.ModuleType("flash_attn")
    package.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    package.__version__ = "2.8.3"
    package.flash_attn_func, package.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    package.flash_attn_with_kvcache = flash_attn_with_kvcache
    padding = types.ModuleType("flash_attn.bert_padding")
    padding.pad_input, padding.unpad_input = _pad_input, _unpad_input  # transformers' own torch versions
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.bert_padding", padding)
    available = lambda *args, **kwargs: True  # noqa: E731
    monkeypatch.setattr(fa_utils, "is_flash_attn_2_available", available)
    monkeypatch.setitem(fa_utils.FLASH_ATTENTION_COMPATIBILITY_MATRIX[2], "general_availability_check", available)
    monkeypatch.setattr(fa_utils, "_loaded_implementation", None)  # re-import the kernels from the fake package


# ---- torch.nn.attention.varlen.varlen_attn, in the signatures torch has had ----
def varlen_attn_2_11(
    query,
    key,
    value,
    cu_seq_q,
    cu_seq_k,
    max_q,
    max_k,
    *,
    return_aux=None,
    scale=None,
    window_size=(-1, -1),
    enable_gqa=False,
    seqused_k=None,
    block_table=None,
    num_splits=None,
):
    """torch >= 2.11: `window_size` (default (-1, -1), i.e. NOT causal) and `enable_gqa`."""
    CALLS["varlen_attn"] += 1
    if not enable_gqa and query.shape[1] != key.shape[1]:
        raise ValueError("Expect query and key/value to have the same number of heads; set enable_gqa=True")
    is_causal = window_size == (-1, 0)  # exactly torch's test: a list [-1, 0] is not causal
    if not is_causal and tuple(window_size) != (-1, -1):
        raise NotImplementedError(f"stand-in: sliding window {window_size}")
    return _attend(query, key, value, cu_seq_q, cu_seq_k, is_causal, scale)


def varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None, scale=None):
    """torch 2.10: an `is_causal` flag and no grouped-query support."""
    CALLS["varlen_attn"] += 1
    if query.shape[1] != key.shape[1]:
        raise ValueError("Expect query and key/value to have the same number of heads")
    return _attend(query, key, value, cu_seq_q, cu_seq_k, is_causal, scale)


VARLEN_SIGNATURES = {"2.10": varlen_attn_2_10, "2.11+": varlen_attn_2_11}


def install_varlen(monkeypatch, signature: str = "2.11+") -> None:
    from torch.nn.attention import varlen

    monkeypatch.setattr(varlen, "varlen_attn", VARLEN_SIGNATURES[signature])


def allow_flash_kernels_on_cpu(monkeypatch) -> None:
    """shardtune refuses flash kernels off CUDA; the stand-ins run anywhere, in fp32 too."""
    import launch.attention

    monkeypatch.setattr(launch.attention, "_gpu_problem", lambda *args: None)


def install_all(kernel: str, signature: str = "2.11+") -> None:
    """For driver scripts outside pytest (the patches stay for the life of the process)."""
    import pytest

    patch = pytest.MonkeyPatch()
    allow_flash_kernels_on_cpu(patch)
    if kernel == "flash_attention_2":
        install_flash_attn(patch)
    else:
        install_varlen(patch, signature)
