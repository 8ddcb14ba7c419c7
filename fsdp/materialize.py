"""Materialising a sharded model that was built on `meta`: allocate only this rank's shards, then fill them from the
pretrained weights that rank 0 alone reads, one tensor at a time by broadcast.

Rank 0 holds its shards plus one full tensor (and the file buffer it was read from); every other rank its shards plus
one tensor being received. No rank ever builds a second model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate the (sharded) parameters and buffers on `device`; their values are uninitialised."""
    model.to_empty(device=device)


@torch.no_grad()
def load_from_rank0(model: nn.Module, read: Callable[[str], torch.Tensor] | None, device: torch.device) -> None:
    """Collective. `read(name)` returns a full tensor of `model.state_dict()` on rank 0 (None elsewhere). Each tensor is
    broadcast once, on `device` (NCCL needs CUDA tensors), and every rank copies out only its own shard."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    for name, target in model.state_dict().items():
        full = read(name).to(device) if rank == 0 else torch.empty(target.shape, dtype=target.dtype, device=device)
        if world > 1:
            dist.broadcast(full, src=0)
        if isinstance(target, DTensor):
            # Every rank has the full tensor: slicing out the local shard needs no communication.
            local = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None).to_local()
            target.to_local().copy_(local)
        else:
            target.copy_(full)
        del full
