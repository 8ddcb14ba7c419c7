"""Materialising a sharded model that was built on `meta`: allocate only this rank's shards, then fill them from
rank 0's full weights by broadcast (rank 0 alone reads the pretrained files) — or from a checkpoint."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict


def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate the (sharded) parameters and buffers on `device`; their values are uninitialised."""
    model.to_empty(device=device)


def load_from_rank0(model: nn.Module, full_model: nn.Module | None) -> None:
    """Collective. `full_model` is the unsharded model with the weights on rank 0 and None elsewhere; each tensor is
    broadcast once and every rank keeps only its shard, so no other rank ever holds the full model."""
    state = full_model.state_dict() if full_model is not None else {}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
