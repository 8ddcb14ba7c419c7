"""Test driver (torchrun): build the tiny backbone once on meta, shard it, materialise, recompute buffers and load the
pretrained weights that rank 0 alone reads, one tensor at a time by broadcast. Rank 0 then checks the gathered model
against plain transformers (from_pretrained + resize_token_embeddings); every rank checks its recomputed buffers."""

from __future__ import annotations

import gc
import sys

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer

from backbones import build_backbone
from backbones.tiny import ensure_tiny_model
from fsdp import apply_parallelism, build_mesh, init_distributed, is_rank0, read_env, teardown
from fsdp.materialize import load_from_rank0, materialize


def plain_transformers_model():
    """The reference, built without shardtune: the vocabulary grown for <PAD> as transformers does it."""
    directory = ensure_tiny_model()
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    return model, len(tokenizer) - 1


def main() -> None:
    env = read_env()
    init_distributed(env)
    backbone = model = None
    try:
        torch.manual_seed(0)
        backbone = build_backbone("llama2-tiny-chat", load_weights=False)
        model = apply_parallelism(
            backbone.llm, backbone.transformer_layer_cls, build_mesh(env, "full"), param_dtype=None
        )
        materialize(model, env.device)
        backbone.init_non_persistent_buffers()
        load_from_rank0(model, backbone.pretrained_weights() if is_rank0() else None, env.device)
        local = {n: p.to_local() for n, p in model.named_parameters()}
        assert all(t.numel() < dict(model.named_parameters())[n].numel() for n, t in local.items()), "not sharded"
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        gathered = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        reference, old_vocab = plain_transformers_model()
        if is_rank0():
            expected = reference.state_dict()
            assert gathered.keys() == expected.keys()
            for name, tensor in expected.items():
                if name in ("model.embed_tokens.weight", "lm_head.weight"):
                    # pretrained rows exactly; rows for new tokens are samples of the same 1e-9-wide distribution
                    assert torch.equal(gathered[name][:old_vocab], tensor[:old_vocab]), name
                    torch.testing.assert_close(gathered[name], tensor, rtol=0, atol=1e-4)
                else:
                    assert torch.equal(gathered[name], tensor), name
            print("BROADCAST_LOAD_OK", len(expected), "tensors", len(buffers), "buffers", flush=True)
        for name, buffer in reference.named_buffers():  # every rank recomputed them; none was broadcast
            assert torch.equal(buffers[name], buffer), name
    finally:
        backbone = model = None  # release the sharded model before its process groups
        gc.collect()
        teardown()
    sys.exit(0)


if __name__ == "__main__":
    main()
