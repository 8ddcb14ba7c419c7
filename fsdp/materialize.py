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
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate the (sharded) parameters and buffers on `device`; their values are uninitialised. A parameter shared
    by several modules (tied embeddings) must stay one parameter: FSDP2 keeps it so through `to_empty` (a plain
    module would not), and a tie lost here would silently train two matrices."""
    shared = shared_parameters(model)
    model.to_empty(device=device)
    for names in shared:
        tensors = [model.get_parameter(name) for name in names]
        if any(t is not tensors[0] for t in tensors):
            raise RuntimeError(f"materialising the sharded model broke the tie between {', '.join(names)}")


def shared_parameters(model: nn.Module) -> list[list[str]]:
    """Groups of names that refer to one parameter (tied embeddings: embed_tokens.weight and lm_head.weight)."""
    names: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            full = f"{module_name}.{name}" if module_name else name
            if full not in names.setdefault(id(param), []):
                names[id(param)].append(full)
    return [group for group in names.values() if len(group) > 1]


@torch.no_grad()
def load_from_rank0(model: nn.Module, read: Callable[[str], torch.Tensor] | None, device: torch.device) -> None:
    """Collective. `read(name)` returns a full tensor of `model.state_dict()` on rank 0 (None elsewhere). Each tensor is
    broadcast once, on `device` (NCCL needs CUDA tensors), and every rank copies out only its own shard."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    aliases = {name for group in shared_parameters(model) for name in group[1:]}  # a tied head: loaded with embed
    for name, target in model.state_dict().items():
        if name in aliases:
            continue
        full = read(name).to(device) if rank == 0 else torch.empty(target.shape, dtype=target.dtype, device=device)
        if world > 1:
            dist.broadcast(full, src=0)
        if isinstance(target, DTensor):
            target.to_local().copy_(local_view(full, target))
        else:
            target.copy_(full)
        del full


def local_view(full: torch.Tensor, target: DTensor) -> torch.Tensor:
    """This rank's shard of `full` as a view (no copy): every rank has the whole tensor after the broadcast."""
    shape, offset = compute_local_shape_and_global_offset(full.shape, target.device_mesh, target.placements)
    view = full
    for dim, (start, length) in enumerate(zip(offset, shape)):
        if length != full.shape[dim]:
            view = view.narrow(dim, start, length)
    return view
