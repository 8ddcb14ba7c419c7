"""Test driver (torchrun): build the tiny backbone on meta, shard it, materialise, recompute buffers and load rank 0's
weights by broadcast; rank 0 then checks the gathered model against plain from_pretrained + resize."""

from __future__ import annotations

import gc
import sys

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from backbones import build_backbone
from fsdp import apply_parallelism, build_mesh, init_distributed, read_env, teardown
from fsdp.materialize import load_from_rank0, materialize
from launch.config import FSDPConfig


def main() -> None:
    env = read_env()
    init_distributed(env)
    reference = backbone = model = None
    try:
        torch.manual_seed(0)
        reference = build_backbone("llama2-tiny-chat").llm if env.is_rank0 else None
        backbone = build_backbone("llama2-tiny-chat", load_weights=False)
        model = apply_parallelism(backbone.llm, backbone.transformer_layer_cls, FSDPConfig(mixed_precision="fp32"),
                                  build_mesh(env, "full"), torch.bfloat16)
        materialize(model, env.device)
        backbone.init_non_persistent_buffers()
        load_from_rank0(model, reference)
        local = {n: p.to_local() for n, p in model.named_parameters()}
        assert all(t.numel() < dict(model.named_parameters())[n].numel() for n, t in local.items()), "not sharded"
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        gathered = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if env.is_rank0:
            expected = reference.state_dict()
            assert gathered.keys() == expected.keys()
            for name, tensor in expected.items():
                assert torch.equal(gathered[name], tensor), name
            for name, buffer in reference.named_buffers():
                assert torch.equal(buffers[name], buffer), name
            print("BROADCAST_LOAD_OK", len(expected), "tensors", len(buffers), "buffers", flush=True)
        else:  # other ranks check their recomputed buffers too (they never saw rank 0's model)
            fresh = build_backbone("llama2-tiny-chat").llm
            for name, buffer in fresh.named_buffers():
                assert torch.equal(buffers[name], buffer), name
    finally:
        reference = backbone = model = None  # release the sharded model before its process groups
        gc.collect()
        teardown()
    sys.exit(0)


if __name__ == "__main__":
    main()
