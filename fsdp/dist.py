"""Process group, device and mesh: the one place that chooses CUDA + NCCL or CPU + gloo.

Reads the environment that torchrun, `srun`-started torchrun and `accelerate launch` all set (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT); with none of it (plain `python`), it runs as a single process.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.local_world_size


def read_env() -> DistEnv:
    """Ranks from the launcher's environment, and the device/backend pair — before any process group exists."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if torch.cuda.is_available() and os.environ.get("SHARDTUNE_DEVICE", "cuda") != "cpu":
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    return DistEnv(rank, world_size, local_rank, local_world_size, device, backend)


def process_group_backend(device: torch.device, cpu_collectives: bool) -> str:
    """NCCL for CUDA tensors, gloo on CPU. With CPU offload the gradient-norm clip and the export reduce CPU DTensors,
    which NCCL cannot ("No backend type associated with device type cpu", pytorch#148532): a gloo backend for CPU
    tensors beside NCCL, as torchtune does."""
    if device.type == "cuda":
        return "cuda:nccl,cpu:gloo" if cpu_collectives else "nccl"
    return "gloo"


def init_distributed(env: DistEnv, timeout_s: float = 1800, cpu_collectives: bool = False) -> None:
    """Start the process group (a one-process group for plain `python`: FSDP2 still needs a mesh).
    `cpu_collectives`: also reduce CPU tensors on a GPU run (CPU offload)."""
    if dist.is_initialized():
        return
    launched = "MASTER_ADDR" in os.environ
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    timeout = timedelta(seconds=timeout_s)
    if launched:
        store, _, _ = next(dist.rendezvous("env://", rank=env.rank, world_size=env.world_size, timeout=timeout))
    else:  # plain `python`: an in-memory store, no port (and nothing for child processes to inherit)
        store = dist.HashStore()
    # After an elastic restart the store still holds the dead generation's gloo/NCCL addresses under the same keys;
    # reading them, new workers connect to ports nobody listens on and fail or hang. One namespace per attempt.
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    global _store
    _store = dist.PrefixStore(f"shardtune/attempt-{attempt}", store)
    dist.init_process_group(
        process_group_backend(env.device, cpu_collectives),
        store=_store,
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
        device_id=env.device if env.device.type == "cuda" else None,
    )
    global _timeout_s
    _timeout_s = timeout_s


_store = None


def process_group_store():
    """The store the process group was built on (rank 0 serves it): heartbeats go there."""
    return _store if dist.is_initialized() else None


def build_mesh(env: DistEnv, sharding: str) -> DeviceMesh:
    """1-D mesh for full/grad-op; 2-D (replicate, shard) for hybrid (shard within a node) and none (pure replicas)."""
    device_type = env.device.type
    if sharding == "hybrid":
        return init_device_mesh(
            device_type, (env.num_nodes, env.local_world_size), mesh_dim_names=("replicate", "shard")
        )
    if sharding == "none":
        return init_device_mesh(device_type, (env.world_size, 1), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device_type, (env.world_size,), mesh_dim_names=("shard",))


def is_rank0() -> bool:
    """The one answer to "am I rank 0?": the process group's rank once it exists, else the launcher's RANK."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s Python object on every rank (one collective; all ranks must call it)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order (one collective; all ranks must call it)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


_timeout_s: float | None = None


def set_collective_timeout(seconds: float) -> None:
    """The time after which a collective that has not finished fails on the ranks waiting in it (a rank stopped
    responding), for every process group of this process: the default group, the mesh's, the async-save group."""
    global _timeout_s
    if not dist.is_initialized() or seconds == _timeout_s:
        return
    from torch.distributed.distributed_c10d import _set_pg_timeout, _world

    for group in list(_world.pg_map):
        _set_pg_timeout(timedelta(seconds=seconds), group)
    _timeout_s = seconds


@contextmanager
def collective_timeout(seconds: float):
    """A longer (or shorter) collective timeout for a phase, e.g. loading and checkpoint saves."""
    previous = _timeout_s
    set_collective_timeout(seconds)
    try:
        yield
    finally:
        if previous is not None:
            set_collective_timeout(previous)


def collective_failure(error: BaseException) -> str | None:
    """What a failed collective means, from the backends' messages (gloo, NCCL), or None for another error."""
    text = str(error)
    if "Timed out" in text or "timed out" in text or "Watchdog caught collective operation timeout" in text:
        return "a collective did not finish in time: a rank stopped responding"
    if (
        "Connection closed by peer" in text
        or "Connection reset by peer" in text
        or "NCCL communicator was aborted" in text
    ):
        return "a peer process failed or was killed"
    return None


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums of Python numbers over all ranks, in float64 (exact for token counts)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def teardown() -> None:
    global _store
    _store = None
    if dist.is_initialized():
        dist.destroy_process_group()
