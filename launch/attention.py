"""Choosing the attention kernel, in one place: flash-attn's FlashAttention-2 where it imports and can run, else
PyTorch's own FA2 varlen kernel (torch >= 2.11), else SDPA, with one log line saying which and why.

The two flash kernels take padding-free batches (`takes_flat_batches`): one flattened row per micro-batch with
`cu_seq_lens`, so no padding token is computed and attention never crosses examples. SDPA and eager take padded or
packed rows with masks (transformers builds a per-example mask from restarting position ids).
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from backbones.attention import TORCH_VARLEN, torch_varlen_kernel

FLASH_KERNELS = ("flash_attention_2", TORCH_VARLEN)
IMPLEMENTATIONS = ("auto", *FLASH_KERNELS, "sdpa", "eager")
# FlashAttention-2 kernels (flash-attn's and torch's) need Ampere (sm80) or newer.
MIN_CAPABILITY = (8, 0)


class AttentionError(ValueError):
    pass


def takes_flat_batches(attn_implementation: str) -> bool:
    return attn_implementation in FLASH_KERNELS


def _gpu_problem(name: str, device: torch.device, mixed_precision: str) -> str | None:
    if device.type != "cuda":
        return f"the run is on {device.type}, and {name} needs a CUDA GPU"
    if mixed_precision != "bf16":
        return f"--fsdp.mixed_precision={mixed_precision}: {name} computes in bf16/fp16 only; use bf16"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return f"{torch.cuda.get_device_name(device)} is sm{capability[0]}{capability[1]}; {name} needs sm80 or newer"
    return None


def kernel_problem(implementation: str, device: torch.device, mixed_precision: str) -> str | None:
    """Why `implementation` cannot run here, or None when it can."""
    if implementation == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            return "the flash-attn package is not installed (pip install 'shardtune[flash]', which builds it for CUDA)"
        try:
            importlib.import_module("flash_attn")
        except (ImportError, OSError) as error:  # typically built against another torch
            return f"flash-attn is installed but does not import ({error}); rebuild it against this torch"
        return _gpu_problem("FlashAttention-2 (flash-attn)", device, mixed_precision)
    if implementation == TORCH_VARLEN:
        if torch_varlen_kernel() is None:
            return f"torch {torch.__version__} has no torch.nn.attention.varlen (needs torch >= 2.11)"
        return _gpu_problem("torch's varlen FlashAttention-2", device, mixed_precision)
    return None


def resolve_attn_implementation(requested: str, device: torch.device, mixed_precision: str) -> tuple[str, str]:
    """(implementation, one log line saying what was chosen and why)."""
    if requested in FLASH_KERNELS:
        problem = kernel_problem(requested, device, mixed_precision)
        if problem:
            raise AttentionError(
                f"--model.attn_implementation={requested} cannot be used: {problem}; "
                "or choose --model.attn_implementation=sdpa (or auto)"
            )
        return requested, f"attention: {requested} (requested), padding-free batches"
    if requested != "auto":
        return requested, f"attention: {requested} (requested)"
    reasons = []
    for implementation in FLASH_KERNELS:
        problem = kernel_problem(implementation, device, mixed_precision)
        if problem is None:
            skipped = f"; {reasons[0]}" if reasons else ""
            return implementation, f"attention: {implementation} (auto), padding-free batches{skipped}"
        reasons.append(f"{implementation} unavailable: {problem}")
    return "sdpa", f"attention: PyTorch SDPA (auto; {'; '.join(reasons)})"
