"""Choosing the attention kernel: FlashAttention-2 where it can run (flash-attn installed, CUDA, bf16), else SDPA."""

from __future__ import annotations

import importlib.util

import torch


class AttentionError(ValueError):
    pass


def flash_attn_problem(device: torch.device, mixed_precision: str) -> str | None:
    """Why FlashAttention-2 cannot run here, or None when it can."""
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package is not installed (pip install 'shardtune[flash]', which builds flash-attn for CUDA)"
    if device.type != "cuda":
        return f"the run is on {device.type}, and FlashAttention-2 needs a CUDA GPU"
    if mixed_precision != "bf16":
        return f"--fsdp.mixed_precision={mixed_precision}: FlashAttention-2 computes in bf16/fp16 only; use bf16"
    return None


def resolve_attn_implementation(requested: str, device: torch.device, mixed_precision: str) -> tuple[str, str]:
    """(implementation, one log line saying what was chosen and why)."""
    problem = flash_attn_problem(device, mixed_precision)
    if requested == "flash_attention_2" and problem:
        raise AttentionError(f"--model.attn_implementation=flash_attention_2 cannot be used: {problem}; "
                             "or choose --model.attn_implementation=sdpa (or auto)")
    if requested == "auto":
        if problem is None:
            return "flash_attention_2", "attention: FlashAttention-2 (auto)"
        return "sdpa", f"attention: PyTorch SDPA (auto; FlashAttention-2 unavailable: {problem})"
    return requested, f"attention: {requested} (requested)"
