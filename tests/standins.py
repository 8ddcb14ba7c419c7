"""Exact torch stand-ins for the CUDA flash kernels, placed where the CUDA kernel sits, so that CPU tests run the whole
real dispatch above it.

- torch's varlen attention: the public `torch.nn.attention.varlen.varlen_attn` of the installed torch runs for real,
  with its own signature, its custom op `torch_attn::_varlen_attn` and that op's autograd; only the CUDA kernels it
  ends in, `aten::_flash_attention_forward` and `aten::_flash_attention_backward`, get CPU implementations here.
- flash-attn: a fake `flash_attn` package built as flash-attn 2.8 is: `flash_attn_func` / `flash_attn_varlen_func`
  with 2.8.3's signatures (transformers inspects them), autograd Functions that call custom ops named as 2.8's
  (`flashattn::_flash_attn_varlen_forward`, ...), and those ops' bodies computing with torch instead of
  `flash_attn_2_cuda`.
Selective activation checkpointing, transformers' attention dispatch, mask creation, unpadding, and shardtune's
batching and varlen adapter all see what they see on a GPU. Each kernel computes every sequence alone with SDPA's math,
honours causal flags, grouped-query heads and the scale, and counts its calls so that a test can prove it ran (and
how often: a recomputed attention calls its forward kernel twice).
"""

from __future__ import annotations

import importlib.machinery
import inspect
import sys
import types
from collections import Counter

import torch
import torch.nn.functional as F

CALLS: Counter = Counter()


def _attend(q, k, v, cu_q, cu_k, causal: bool, scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """q/k/v: [total tokens, heads, dim] (k/v may have fewer heads); each cu-delimited sequence attends to itself.
    Returns the output [total, heads, dim] and the log-sum-exp of the scaled scores [heads, total] (fp32)."""
    if k.shape[1] != q.shape[1]:
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    out = torch.zeros_like(q)
    lse = torch.zeros(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    for i in range(len(cu_q) - 1):
        qa, qb, ka, kb = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        if qb == qa:
            continue
        qs, ks, vs = (x.transpose(0, 1)[None] for x in (q[qa:qb], k[ka:kb], v[ka:kb]))
        out[qa:qb] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale)[0].transpose(0, 1)
        scores = (qs[0].float() @ ks[0].float().transpose(-1, -2)) * scale
        if causal:
            scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
        lse[:, qa:qb] = scores.logsumexp(-1)
    return out, lse


def _attend_grads(grad_out, q, k, v, cu_q, cu_k, causal: bool, scale: float | None):
    """Gradients of `_attend`'s output with respect to q, k, v, by the textbook attention backward (a kernel runs
    below autograd, so it cannot ask autograd): with P = softmax(scale QK^T), dV = P^T dO, dS = P (dO V^T - rowsum),
    dQ = scale dS K, dK = scale dS^T Q; grouped K/V heads sum the gradients of the query heads they serve."""
    heads, groups = q.shape[1], q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    dq = torch.zeros_like(q, dtype=acc)
    dk = torch.zeros(k.shape[0], heads, k.shape[2], dtype=acc)
    dv = torch.zeros(v.shape[0], heads, v.shape[2], dtype=acc)
    kr, vr = (x.repeat_interleave(groups, dim=1) for x in (k, v))
    for i in range(len(cu_q) - 1):
        qa, qb, ka, kb = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        if qb == qa:
            continue
        qs, ks, vs, do = (x.to(acc).transpose(0, 1) for x in (q[qa:qb], kr[ka:kb], vr[ka:kb], grad_out[qa:qb]))
        scores = (qs @ ks.transpose(-1, -2)) * scale
        if causal:
            scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
        p = scores.softmax(-1)
        dv[ka:kb] = (p.transpose(-1, -2) @ do).transpose(0, 1)
        dp = do @ vs.transpose(-1, -2)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        dq[qa:qb] = (scale * ds @ ks).transpose(0, 1)
        dk[ka:kb] = (scale * ds.transpose(-1, -2) @ qs).transpose(0, 1)
    dk, dv = (x.unflatten(1, (k.shape[1], groups)).sum(2) for x in (dk, dv))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _causal(is_causal: bool, left: int | None, right: int | None) -> bool:
    if left not in (None, -1) or right not in (None, -1, 0):
        raise NotImplementedError(f"stand-in: sliding window ({left}, {right})")
    return bool(is_causal)


# ---- aten::_flash_attention_forward / _backward: the CUDA kernels under torch's varlen_attn ----
def _bind(op, args, kwargs) -> dict:
    """The arguments of an aten kernel call by name, as the installed torch's schema names them."""
    names = [a.name for a in op._schema.arguments]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def _flash_attention_forward_cpu(*args, **kwargs):
    a = _bind(torch.ops.aten._flash_attention_forward.default, args, kwargs)
    CALLS["aten._flash_attention_forward"] += 1
    if a["dropout_p"] or a.get("seqused_k") is not None or a.get("block_table") is not None:
        raise NotImplementedError("stand-in: dropout, seqused_k and block_table are not used by shardtune")
    causal = _causal(a["is_causal"], a.get("window_size_left"), a.get("window_size_right"))
    q = a["query"]
    out, lse = _attend(q, a["key"], a["value"], a["cum_seq_q"], a["cum_seq_k"], causal, a.get("scale"))
    empty = q.new_empty(0)
    return out, lse, torch.zeros(2, dtype=torch.uint64), empty, empty


def _flash_attention_backward_cpu(*args, **kwargs):
    a = _bind(torch.ops.aten._flash_attention_backward.default, args, kwargs)
    CALLS["aten._flash_attention_backward"] += 1
    causal = _causal(a["is_causal"], a.get("window_size_left"), a.get("window_size_right"))
    return _attend_grads(a["grad_out"], a["query"], a["key"], a["value"], a["cum_seq_q"], a["cum_seq_k"], causal,
                         a.get("scale"))  # fmt: skip


_ATEN_LIBRARY = None


def install_aten_flash_kernels() -> None:
    """CPU kernels for the two aten ops that torch's varlen attention ends in (they exist only for CUDA). Once per
    process: an added CPU kernel changes nothing else (those ops have none otherwise)."""
    global _ATEN_LIBRARY
    if _ATEN_LIBRARY is not None:
        return
    library = torch.library.Library("aten", "IMPL")
    library.impl("_flash_attention_forward", _flash_attention_forward_cpu, "CPU")
    library.impl("_flash_attention_backward", _flash_attention_backward_cpu, "CPU")
    _ATEN_LIBRARY = library


# The public signature of torch.nn.attention.varlen.varlen_attn in each torch shardtune supports, as released.
# The adapter (backbones/attention.py) reads the installed one; a new torch fails the test that compares them here.
VARLEN_SIGNATURES = {
    "2.11": "(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, "
    "window_size=(-1, -1))",
    "2.13": "(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, "
    "window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None)",
}


def _real_varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    return varlen_attn


REAL_VARLEN_ATTN = _real_varlen_attn()


def installed_torch_minor() -> str:
    return ".".join(torch.__version__.split("+")[0].split(".")[:2])


def plain_signature(function) -> str:
    """A signature without annotations: the form VARLEN_SIGNATURES records."""
    parameters = [
        p.replace(annotation=inspect.Parameter.empty) for p in inspect.signature(function).parameters.values()
    ]
    return str(inspect.Signature(parameters))


def varlen_attn_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1)):  # fmt: skip
    """torch 2.11's public signature (no enable_gqa: grouped-query heads must be repeated by the caller) over the
    installed torch's real varlen_attn, so that a newer torch also runs the branch torch 2.11 takes."""
    if query.shape[1] != key.shape[1]:
        raise ValueError("Expect query and key/value to have the same number of heads (torch 2.11 has no enable_gqa)")
    return REAL_VARLEN_ATTN(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, return_aux=return_aux, scale=scale,
                            window_size=window_size)  # fmt: skip


def install_varlen(monkeypatch, form: str = "installed") -> None:
    """torch's real varlen_attn on CPU (its CUDA kernels replaced); `form="2.11"` presents torch 2.11's signature."""
    from torch.nn.attention import varlen

    install_aten_flash_kernels()
    if form == "2.11":
        monkeypatch.setattr(varlen, "varlen_attn", varlen_attn_2_11)


# ---- a fake flash-attn 2.8: public functions -> autograd Functions -> custom ops -> (here) torch ----
FLASH_ATTN_VERSION = "2.8.3"
_FLASH_OPS = None


def _define_flash_ops() -> types.SimpleNamespace:
    """Custom ops with flash-attn 2.8's names and schemas (`flashattn::...`), computing with torch on any device."""
    global _FLASH_OPS
    if _FLASH_OPS is not None:
        return _FLASH_OPS
    from torch.library import custom_op

    @custom_op("flashattn::_flash_attn_varlen_forward", mutates_args=())
    def varlen_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                       cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float,
                       softmax_scale: float, causal: bool, window_size_left: int = -1, window_size_right: int = -1,
                       softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None, return_softmax: bool = False,
                       block_table: torch.Tensor | None = None, leftpad_k: torch.Tensor | None = None,
                       seqused_k: torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        CALLS["flashattn._flash_attn_varlen_forward"] += 1
        assert not dropout_p and not softcap and alibi_slopes is None and block_table is None
        causal = _causal(causal, window_size_left, window_size_right)
        out, lse = _attend(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale)
        return out, lse, q.new_empty(0), torch.zeros(2, dtype=torch.int64)

    @custom_op("flashattn::_flash_attn_varlen_backward", mutates_args=("dq", "dk", "dv"))
    def varlen_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                        softmax_lse: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
                        cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                        dropout_p: float, softmax_scale: float, causal: bool, window_size_left: int,
                        window_size_right: int, softcap: float, alibi_slopes: torch.Tensor | None,
                        deterministic: bool, rng_state: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        CALLS["flashattn._flash_attn_varlen_backward"] += 1
        causal = _causal(causal, window_size_left, window_size_right)
        for target, grad in zip((dq, dk, dv), _attend_grads(dout, q, k, v, cu_seqlens_q, cu_seqlens_k, causal,
                                                            softmax_scale)):  # fmt: skip
            target.copy_(grad)
        return softmax_lse.new_zeros(softmax_lse.shape)

    _FLASH_OPS = types.SimpleNamespace(varlen_forward=varlen_forward, varlen_backward=varlen_backward)
    return _FLASH_OPS


class FlashAttnVarlenFunc(torch.autograd.Function):
    """As flash-attn's: the forward op's outputs are saved, the backward op fills dq/dk/dv."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                causal, window_size):  # fmt: skip
        softmax_scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        out, lse, _, rng_state = torch.ops.flashattn._flash_attn_varlen_forward(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal=causal,
            window_size_left=window_size[0], window_size_right=window_size[1])  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, rng_state)
        ctx.args = (max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_size)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_q, cu_k, rng_state = ctx.saved_tensors
        max_q, max_k, dropout_p, scale, causal, window = ctx.args
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        torch.ops.flashattn._flash_attn_varlen_backward(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k,
                                                         dropout_p, scale, causal, window[0], window[1], 0.0, None,
                                                         False, rng_state)  # fmt: skip
        return dq, dk, dv, *([None] * 8)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):  # fmt: skip
    """flash-attn 2.8.3's signature; [total tokens, heads, dim]."""
    assert not softcap and alibi_slopes is None and not return_attn_probs and block_table is None
    return FlashAttnVarlenFunc.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                     softmax_scale, causal, tuple(window_size))  # fmt: skip


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):  # fmt: skip
    """flash-attn 2.8.3's signature; [batch, tokens, heads, dim], every row one sequence (here through the varlen op,
    which gives each row exactly what the dense kernel gives it)."""
    batch, q_len, k_len = q.shape[0], q.shape[1], k.shape[1]
    cu_q = torch.arange(batch + 1, dtype=torch.int32) * q_len
    cu_k = torch.arange(batch + 1, dtype=torch.int32) * k_len
    out = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, q_len, k_len,
                                 dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes)  # fmt: skip
    return out.view_as(q)


def flash_attn_with_kvcache(*args, **kwargs):
    raise NotImplementedError("the stand-in has no KV-cache kernel")


def fake_flash_attn_modules() -> dict[str, types.ModuleType]:
    from transformers.modeling_flash_attention_utils import _pad_input, _unpad_input

    _define_flash_ops()
    package = types.ModuleType("flash_attn")
    package.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    package.__version__ = FLASH_ATTN_VERSION
    package.flash_attn_func, package.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    package.flash_attn_with_kvcache = flash_attn_with_kvcache
    padding = types.ModuleType("flash_attn.bert_padding")
    padding.pad_input, padding.unpad_input = _pad_input, _unpad_input  # transformers' own torch versions
    return {"flash_attn": package, "flash_attn.bert_padding": padding}


def install_flash_attn(monkeypatch) -> None:
    """The fake `flash_attn` package, and transformers told that FlashAttention-2 is usable."""
    from transformers import modeling_flash_attention_utils as fa_utils

    for name, module in fake_flash_attn_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    available = lambda *args, **kwargs: True  # noqa: E731
    monkeypatch.setattr(fa_utils, "is_flash_attn_2_available", available)
    monkeypatch.setitem(fa_utils.FLASH_ATTENTION_COMPATIBILITY_MATRIX[2], "general_availability_check", available)
    monkeypatch.setattr(fa_utils, "_loaded_implementation", None)  # re-import the kernels from the fake package


def allow_flash_kernels_on_cpu(monkeypatch) -> None:
    """shardtune refuses flash kernels off CUDA; the stand-ins run anywhere, in fp32 too."""
    import launch.attention

    monkeypatch.setattr(launch.attention, "_gpu_problem", lambda *args: None)


def install_all(kernel: str) -> None:
    """For driver scripts outside pytest (the patches stay for the life of the process)."""
    import pytest

    patch = pytest.MonkeyPatch()
    allow_flash_kernels_on_cpu(patch)
    if kernel == "flash_attention_2":
        install_flash_attn(patch)
    else:
        install_varlen(patch)
