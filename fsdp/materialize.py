"""Materialising a sharded model that was built on `meta`: rank 0 holds the full weights, every rank receives only its
shards by broadcast, and non-persistent buffers (rotary `inv_freq`) are sent too instead of left as garbage."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict


def non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    persistent = set(model.state_dict().keys())
    return {name: buf for name, buf in model.named_buffers() if name not in persistent}


def load_from_rank0(model: nn.Module, full_model: nn.Module | None, device: torch.device) -> None:
    """`model` is sharded and on `meta`; `full_model` (rank 0 only, else None) holds the weights to load."""
    model.to_empty(device=device)
    state = full_model.state_dict() if full_model is not None else {}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    sources = non_persistent_buffers(full_model) if full_model is not None else {}
    for name, buffer in sorted(non_persistent_buffers(model).items()):
        if full_model is not None:
            buffer.copy_(sources[name])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(buffer, src=0)
