"""Everything that knows torch.distributed: process group and mesh, FSDP2 sharding, mixed precision, activation
checkpointing, and distributed checkpoint I/O. The training loop uses only the verbs exported here."""

from fsdp.dist import (
    DistEnv,
    all_gather_object,
    all_reduce_sum,
    barrier,
    broadcast_object,
    build_mesh,
    init_distributed,
    is_rank0,
    read_env,
    teardown,
)
from fsdp.heartbeat import Heartbeat
from fsdp.parallelize import apply_parallelism, clip_grad_norm_, set_gradient_sync

__all__ = [
    "DistEnv",
    "Heartbeat",
    "all_gather_object",
    "all_reduce_sum",
    "apply_parallelism",
    "barrier",
    "broadcast_object",
    "build_mesh",
    "clip_grad_norm_",
    "init_distributed",
    "is_rank0",
    "read_env",
    "set_gradient_sync",
    "teardown",
]
