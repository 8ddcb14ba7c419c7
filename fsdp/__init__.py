"""Everything that knows torch.distributed: process group and mesh, FSDP2 sharding, mixed precision, activation
checkpointing, and distributed checkpoint I/O. The training loop uses only the verbs exported here."""

from fsdp.dist import DistEnv, barrier, broadcast_object, build_mesh, init_distributed, read_env, teardown
from fsdp.parallelize import all_reduce_sum, apply_parallelism, clip_grad_norm_, set_gradient_sync

__all__ = [
    "DistEnv", "all_reduce_sum", "apply_parallelism", "barrier", "broadcast_object", "build_mesh", "clip_grad_norm_",
    "init_distributed", "read_env", "set_gradient_sync", "teardown",
]
