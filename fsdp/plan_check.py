"""The planner's check on itself: shard a model built on `meta` with FSDP2 over a fake process group of the planned
world size, and read each rank's bytes from the DTensors (nothing is allocated: the model stays on `meta`)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.testing._internal.distributed.fake_pg import FakeStore

from fsdp.dist import DistEnv, build_mesh
from fsdp.parallelize import apply_parallelism


def dtensor_bytes(model: nn.Module, layer_cls: type[nn.Module], sharding: str, gpus_per_node: int,
                  nodes: int) -> dict[str, int]:  # fmt: skip
    """Rank 0's bytes of fp32 master weights, gradients and AdamW state, from FSDP2's DTensors (a tied parameter
    counted once, as FSDP2 and the optimizer hold it)."""
    world = gpus_per_node * nodes
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        env = DistEnv(0, world, 0, gpus_per_node, torch.device("cpu"), "fake")
        apply_parallelism(model, layer_cls, build_mesh(env, sharding), param_dtype=torch.bfloat16,
                          reshard_after_forward=sharding not in ("grad-op", "none"))  # fmt: skip
        parameters = dict(model.named_parameters())
        params = sum(4 * p.to_local().numel() for p in parameters.values())
        grads = sum(4 * p.to_local().numel() for p in parameters.values() if p.requires_grad)
        return {"params": params, "grads": grads, "adam": 2 * grads}
    finally:
        dist.destroy_process_group()
