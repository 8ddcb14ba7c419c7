"""Test driver (run under torchrun or plain python): trains through launch.train's own functions, then records what
tests cannot see from outside: the dtypes and devices of the sharded master weights and optimizer state, how FSDP2
and activation checkpointing were applied (test-only internals), and the trained model's logits on a batch."""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from fsdp_internals import param_groups
from torch.distributed._composable import checkpoint as composable_checkpoint
from torch.distributed.fsdp import FSDPModule

from fsdp import init_distributed, is_rank0, read_env, teardown
from launch.config import parse_config
from launch.data import build_tokenized, collate
from launch.metrics import setup_logging
from launch.train import fit_and_export, prepare


def fsdp_settings(model, layer_cls) -> dict:
    groups = [group for m in model.modules() if isinstance(m, FSDPModule) for group in param_groups(m)]
    blocks = [m for m in model.modules() if isinstance(m, layer_cls)]
    return {
        "offload_to_cpu": sorted({p.offload_to_cpu for g in groups for p in g.fsdp_params}),
        "reshard_after_forward": sorted({bool(g.post_forward_mesh_info) for g in groups}),
        "checkpointed_blocks": sum(1 for b in blocks if composable_checkpoint.state(b) is not None),
    }


def tie_settings(model, optimizer) -> dict:
    """Whether the head is the embedding (one DTensor), and how often each parameter appears in the optimizer."""
    head, embedding = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    in_optimizer = [id(p) for group in optimizer.param_groups for p in group["params"]]
    return {"head_is_embedding": head is embedding, "embedding_in_optimizer": in_optimizer.count(id(embedding)),
            "optimizer_params_unique": len(in_optimizer) == len(set(in_optimizer)),
            "trainable_params": len([p for p in model.parameters() if p.requires_grad])}  # fmt: skip


def count_graphs_per_step() -> list[int]:
    """torch.compile's graph count after every training step (recompiles show as growth)."""
    import torch._dynamo.utils

    import launch.trainer

    counts, original = [], launch.trainer.Trainer.train_step

    def counted(self):
        record = original(self)
        counts.append(int(torch._dynamo.utils.counters["stats"]["unique_graphs"]))
        return record

    launch.trainer.Trainer.train_step = counted
    return counts


def inspect_run(prepared, env, graphs: list[int]) -> None:
    """Train through fit_and_export, then write inspect.json and inspect_logits.pt into the run directory."""
    trainer = model = None
    try:
        trainer = fit_and_export(prepared, env)
        model = trainer.model.eval()
        held_out = build_tokenized(prepared.config.data, prepared.backbone, "eval", packing=False).dataset
        batch = collate([held_out[i] for i in range(4)], prepared.backbone.tokenizer.pad_token_id, "padded")
        seen = []  # the dtype the first decoder block computes in (bf16 under mixed precision)
        layer_cls = prepared.backbone.transformer_layer_cls
        block = next(m for m in model.modules() if isinstance(m, layer_cls))
        hook = block.mlp.down_proj.register_forward_hook(lambda _m, args, _out: seen.append(str(args[0].dtype)))
        with torch.no_grad():
            inputs = {k: v.to(env.device) for k, v in batch.items() if k != "labels"}
            logits = model(**inputs, use_cache=False).logits.cpu()
        hook.remove()
        for module in model.modules():  # grad-op keeps parameters gathered after a forward
            if isinstance(module, FSDPModule):
                module.reshard()
        state = [t for s in trainer.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        if is_rank0():
            out = Path(prepared.config.run.output_dir)
            torch.save({"batch": batch, "logits": logits.float()}, out / "inspect_logits.pt")
            local = [p.to_local() for p in model.parameters()]
            inspected = {
                "param_dtypes": sorted({str(p.dtype) for p in model.parameters()} | {str(t.dtype) for t in local}),
                "param_devices": sorted({str(t.device) for t in local}),
                "optimizer_state_devices": sorted({str(getattr(t, "device", "?")) for t in state}),
                "backend": str(dist.get_backend_config()),
                "compute_dtype": seen[0],
                "graphs_per_step": graphs,
                "inductor_ran": bool(torch._dynamo.utils.counters["inductor"]),  # imported by count_graphs_per_step
                **fsdp_settings(model, layer_cls),
                **tie_settings(model, trainer.optimizer),
            }
            (out / "inspect.json").write_text(json.dumps(inspected))
    finally:
        trainer = model = prepared = None  # release the sharded model before its process groups (see launch.train)
        gc.collect()


def main() -> None:
    """ARGS [--variants JSON]: with variants ({name: [flags]}), one run per variant in one process group, each into
    OUTPUT_DIR/name (one launch instead of one per variant)."""
    graphs = count_graphs_per_step()
    argv = sys.argv[1:]
    variants = {"": []}
    if "--variants" in argv:
        i = argv.index("--variants")
        variants = json.loads(argv[i + 1])
        del argv[i : i + 2]
    env = read_env()
    setup_logging(is_rank0())
    runs = []
    for name, flags in variants.items():
        out = [] if not name else ["--run.output_dir", f"{parse_config([*argv, *flags]).run.output_dir}/{name}"]
        runs.append(prepare([*argv, *flags, *out], env))
    init_distributed(env, cpu_collectives=any(p.config.fsdp.cpu_offload for p in runs))
    try:
        for prepared in runs:
            inspect_run(prepared, env, graphs)
    finally:
        runs = None
        gc.collect()
        teardown()


if __name__ == "__main__":
    main()
