"""fsdp/ helpers that need no second process: the process-group backend choice and export shard planning."""

from __future__ import annotations

import torch

from fsdp.dist import process_group_backend
from fsdp.export import plan_shards


def test_cpu_offload_on_gpus_starts_a_cpu_backend_beside_nccl():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert process_group_backend(cuda, cpu_collectives=True) == "cuda:nccl,cpu:gloo"
    assert process_group_backend(cuda, cpu_collectives=False) == "nccl"
    assert process_group_backend(cpu, cpu_collectives=True) == "gloo"


def test_export_shards_stay_under_the_size_limit_and_keep_tensor_order():
    sources = [(f"t{i}", torch.Size([n]), None) for i, n in enumerate([100, 200, 50, 300, 10])]
    shards = plan_shards(sources, torch.float32, max_shard_bytes=1200)  # 300 fp32 values per shard
    assert [[name for name, _, _ in shard] for shard in shards] == [["t0", "t1"], ["t2"], ["t3"], ["t4"]]
    # A tensor larger than the limit gets a shard of its own instead of failing.
    assert [[n for n, _, _ in s] for s in plan_shards(sources, torch.float32, max_shard_bytes=100)] == [
        ["t0"],
        ["t1"],
        ["t2"],
        ["t3"],
        ["t4"],
    ]
    assert len(plan_shards(sources, torch.bfloat16, max_shard_bytes=10**6)) == 1
