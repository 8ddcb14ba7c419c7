"""Plan a run before a cluster-day: does a recipe fit on N GPUs, and how long will it take? Offline, in seconds, on CPU.

    python -m launch.plan --config recipes/llama2-7b-chat-full.yaml --gpus-per-node 8 --nodes 1 --gpu h100-80gb \\
        [--section.key value ...] [--mfu 0.40] [--json plan.json]

Per GPU it adds up what the loop holds at its peak, and says "fits" or "does not fit by X GiB" with the first knob to
turn; per node the host RAM at load (as the loader does it) and, with CPU offload, in training; the checkpoint size;
tokens per step, steps per epoch (with the real tokenizer and packing when the data and tokenizer are local) and the
wall time at a stated MFU. The model is built on `meta` from the registry's published shapes, the stage applied (LoRA
included), and sharded by FSDP2 over a fake process group of the planned world size: the per-rank sizes come from
the DTensors themselves and must agree with the arithmetic.

Activations per decoder block and micro-batch of b sequences of s tokens (hidden h, FFN f, key/value width k, a
heads), in bytes for bf16, after Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", sec. 4.1 (their 34sbh + 5as^2b for GPT), recounted for LLaMA (RMSNorm in fp32, SwiGLU, GQA, no dropout):
    none       sb(20h + 4k + 8f)   norm inputs and their fp32 upcasts, Q/K/V, attention output, gate/up/act/product
    selective  sb(10h + 4k + 4f)   the outputs of matmuls and attention only (the rest recomputed)
    full       2sbh                the block's input only; one block's "none" activations live during its recompute
  + attention scores: none for flash kernels; a [b, s, s] boolean mask for SDPA over packed rows; 4as^2b for eager.
Logits: full: 12 bytes per token and vocabulary entry (bf16 logits, fp32 copy, their gradients); chunked: the same for
one chunk of tokens, plus the final hidden states.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

GiB = 2**30
# usable memory (GiB, as the driver reports it) and dense bf16 peak (TFLOP/s) of the GPUs a plan can target
GPUS = {
    "h100-80gb": (79.6, 989.0), "h100-pcie-80gb": (79.6, 756.0), "h100-nvl-94gb": (93.1, 835.0),
    "h200-141gb": (139.8, 989.0), "a100-80gb": (79.2, 312.0), "a100-40gb": (39.4, 312.0), "l40s-48gb": (44.4, 362.0),
}  # fmt: skip
MARGIN_GIB, FRAGMENTATION = 2.0, 0.10  # CUDA context + NCCL buffers; the caching allocator's fragmentation
HOST_BASELINE_GIB = 4.0  # a worker process with torch, CUDA and transformers loaded


@dataclass
class Shape:
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int = 0  # 0: hidden / heads (Qwen3's is wider: 128 at hidden 1024 with 16 heads)

    @property
    def kv_width(self) -> int:
        return (self.head_dim or self.hidden // self.heads) * self.kv_heads


def build_planned_model(config, lora):
    """The recipe's model on `meta` from the registry's published shape (the vocabulary grown for the tokens the family
    adds, e.g. LLaMA-2's <PAD>), through the family's own model class, stage applied as the family says."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from backbones.base import padded_vocab_size
    from backbones.registry import get_backbone_spec

    spec = get_backbone_spec(config.model.backbone)
    shape = dict(spec.config)
    model_type = shape.pop("model_type")
    if spec.added_tokens:
        shape["vocab_size"] = padded_vocab_size(shape["vocab_size"] + spec.added_tokens, shape["vocab_size"], 64)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **shape), attn_implementation="sdpa")
    stage = config.train.stage
    model.requires_grad_(stage == "full")
    if stage == "last-layer":
        for module in spec.cls.last_layer_modules(model):
            module.requires_grad_(True)
    elif stage == "lora":
        from backbones.lora import apply_lora

        apply_lora(model, lora)
    return model, Shape(shape["num_hidden_layers"], shape["hidden_size"], shape["intermediate_size"],
                        shape["num_attention_heads"], shape["num_key_value_heads"], shape["vocab_size"],
                        shape.get("head_dim") or 0)  # fmt: skip


def shard_ways(sharding: str, gpus_per_node: int, nodes: int) -> int:
    return {"full": gpus_per_node * nodes, "grad-op": gpus_per_node * nodes, "hybrid": gpus_per_node, "none": 1}[
        sharding
    ]


def sharded_bytes(model, ways: int) -> dict[str, int]:
    """Rank 0's bytes of fp32 master weights, gradients and AdamW state: FSDP2 shards every tensor on dim 0 in `ways`
    chunks of ceil(rows / ways) rows (rank 0 holds a full chunk)."""
    params = grads = 0
    for p in model.parameters():
        rows = p.shape[0] if p.dim() else 1
        local = math.ceil(rows / ways) * (p.numel() // max(rows, 1))
        params += 4 * local
        grads += 4 * local if p.requires_grad else 0
    return {"params": params, "grads": grads, "adam": 2 * grads}


def activation_bytes(shape: Shape, tokens_per_row: int, rows: int, checkpointing: str, attn: str) -> float:
    s, b, h, k, f, a = tokens_per_row, rows, shape.hidden, shape.kv_width, shape.ffn, shape.heads
    block_none = s * b * (20 * h + 4 * k + 8 * f)
    per_block = {"none": block_none, "selective": s * b * (10 * h + 4 * k + 4 * f), "full": 2 * s * b * h}[
        checkpointing
    ]
    scores = (
        0.0 if attn in ("flash_attention_2", "torch_varlen") else (b * s * s if attn == "sdpa" else 4 * a * s * s * b)
    )
    recompute = block_none if checkpointing != "none" else 0  # one block's activations while it is recomputed
    return shape.layers * (per_block + scores) + recompute + 2 * s * b * h  # + the embedding output


def logits_bytes(shape: Shape, tokens: int, chunk: int) -> float:
    live = min(tokens, chunk) if chunk else tokens
    return 12.0 * live * shape.vocab + (2.0 * tokens * shape.hidden if chunk else 0.0)


def memory_per_gpu(model, shape: Shape, state: dict[str, int], *, sharding: str, micro_batch: int, max_length: int,
                   checkpointing: str, attn: str, loss_chunk: int, cpu_offload: bool,
                   unsharded_accumulation: bool) -> dict[str, float]:  # fmt: skip
    """Bytes one GPU holds at its peak, by kind (see the module docstring for the activation formulas)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    root = total - shape.layers * block
    gathered = total if sharding in ("grad-op", "none") else root + 2 * block  # bf16 in flight (+ the prefetch)
    memory = {
        "master_weights_fp32": 0 if cpu_offload else state["params"],
        "gradients_fp32": 0 if cpu_offload else state["grads"],
        "adamw_state_fp32": 0 if cpu_offload else state["adam"],
        "unsharded_accumulated_grads_fp32": 4 * trainable if unsharded_accumulation else 0,
        "gathered_params_bf16": 2 * gathered + 4 * block,  # + one block's unsharded grads reduced in fp32
        "activations": activation_bytes(shape, max_length, micro_batch, checkpointing, attn),
        "logits_and_loss": logits_bytes(shape, max_length * micro_batch, loss_chunk),
    }
    memory["framework_and_fragmentation"] = MARGIN_GIB * GiB + FRAGMENTATION * sum(memory.values())
    return memory


def plan(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100-80gb")
    parser.add_argument("--mfu", type=float, default=None, help="default: the last make gpu-check's best, else 0.40")
    parser.add_argument("--json", type=Path, default=None, help="also write the plan here")
    parser.add_argument("--no-dtensor-check", action="store_true", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    for flag, value in (("--gpus-per-node", args.gpus_per_node), ("--nodes", args.nodes)):
        if value < 1:
            raise ValueError(f"{flag}={value}: a plan needs at least one; e.g. {flag} {8 if 'gpus' in flag else 1}")
    if args.mfu is not None and not 0 < args.mfu <= 1:
        raise ValueError(f"--mfu={args.mfu} must be in (0, 1], e.g. 0.4")
    from backbones.registry import get_backbone_spec
    from fsdp.plan_check import dtensor_bytes
    from launch.config import parse_config
    from launch.flops import build_flop_counter
    from launch.stage import lora_settings
    from launch.validate import validate_config

    start = time.perf_counter()
    config = parse_config(rest)
    gpus, world = args.gpus_per_node, args.gpus_per_node * args.nodes
    validate_config(config, world, check_paths=False)  # the data and run directories are the cluster's
    device_gib, peak_tflops = GPUS[args.gpu]
    spec = get_backbone_spec(config.model.backbone)
    lora = lora_settings(config, spec.cls.linear_layer_names, bool(spec.config.get("tie_word_embeddings")))
    model, shape = build_planned_model(config, lora)
    flops = build_flop_counter(model)
    fsdp, train, data = config.fsdp, config.train, config.data
    ways = shard_ways(fsdp.sharding, gpus, args.nodes)
    state = sharded_bytes(model, ways)
    check = None if args.no_dtensor_check else dtensor_bytes(model, spec.cls.transformer_layer_cls, fsdp.sharding,
                                                             gpus, args.nodes)  # fmt: skip
    accumulation = train.global_batch_size // (world * train.micro_batch_size)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # An H100 attention kernel: flash-attn or torch's varlen, which `auto` picks on any Ampere-or-newer GPU.
    attn = "torch_varlen" if config.model.attn_implementation == "auto" else config.model.attn_implementation
    memory = memory_per_gpu(model, shape, state, sharding=fsdp.sharding, micro_batch=train.micro_batch_size,
                            max_length=data.max_length, checkpointing=fsdp.activation_checkpointing, attn=attn,
                            loss_chunk=train.loss_chunk_tokens, cpu_offload=fsdp.cpu_offload,
                            unsharded_accumulation=fsdp.unsharded_grad_accumulation and accumulation > 1)  # fmt: skip
    peak = sum(memory.values())
    fits = peak <= device_gib * GiB
    largest = max(p.numel() for p in model.parameters())
    host = {"rank0_at_load_gib": HOST_BASELINE_GIB + 2 * 4 * largest / GiB,  # one tensor: file buffer + fp32 copy
            "other_ranks_at_load_gib": HOST_BASELINE_GIB,
            "node_at_load_gib": HOST_BASELINE_GIB * gpus + 2 * 4 * largest / GiB}  # fmt: skip
    if fsdp.cpu_offload:
        host["node_in_training_gib"] = gpus * (HOST_BASELINE_GIB + sum(state.values()) / GiB)
    tokens_per_step = train.global_batch_size * data.max_length
    step_flops = flops.step_flops([data.max_length] * train.global_batch_size)
    mfu = args.mfu or last_gpu_check_mfu() or 0.40
    step_s = step_flops / (mfu * peak_tflops * 1e12 * world)
    steps = steps_per_epoch(config)
    total_steps = train.max_steps or (steps * train.epochs if steps else None)
    result = {
        "recipe": {
            "backbone": config.model.backbone,
            "stage": train.stage,
            "sharding": fsdp.sharding,
            "activation_checkpointing": fsdp.activation_checkpointing,
            "micro_batch": train.micro_batch_size,
            "max_length": data.max_length,
            "global_batch": train.global_batch_size,
            "accumulation_steps": accumulation,
            "attention": attn,
            "loss_chunk_tokens": train.loss_chunk_tokens,
            "lora": asdict(lora) if lora else None,
        },
        "hardware": {"gpu": args.gpu, "gpus_per_node": gpus, "nodes": args.nodes, "gpu_memory_gib": device_gib},
        "parameters": {"total": total, "trainable": trainable},
        "memory_per_gpu_gib": {k: round(v / GiB, 2) for k, v in memory.items()},
        "peak_per_gpu_gib": round(peak / GiB, 2),
        "fits": fits,
        "verdict": "fits" if fits else f"does not fit by {(peak - device_gib * GiB) / GiB:.1f} GiB",
        "first_knob": None if fits else first_knob(config, memory),
        "sharded_state_bytes": state,
        "dtensor_check": check,
        "host_ram": {k: round(v, 1) for k, v in host.items()},
        "checkpoint_gib": round((4 * total + 8 * trainable) / GiB, 1),
        "export_gib": round((2 if config.export.dtype == "bf16" else 4) * total / GiB, 1),
        "tokens_per_step": tokens_per_step,
        "steps_per_epoch": steps,
        "mfu_assumed": mfu,
        "step_seconds": round(step_s, 2),
        "wall_time_hours": round(step_s * total_steps / 3600, 2) if total_steps else None,
        "plan_seconds": None,
    }
    if check is not None and check != state:
        raise RuntimeError(f"the planner's sharded bytes {state} disagree with FSDP2's DTensors {check}")
    result["plan_seconds"] = round(time.perf_counter() - start, 1)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def first_knob(config, memory: dict) -> str:
    """The change that frees the most of what does not fit, in the order a practitioner would try them."""
    if config.fsdp.activation_checkpointing != "full" and memory["activations"] > 0:
        return "--fsdp.activation_checkpointing full"
    if config.train.micro_batch_size > 1:
        return (
            f"--train.micro_batch_size {config.train.micro_batch_size // 2} (the global batch stays; more accumulation)"
        )
    if not config.train.loss_chunk_tokens:
        return "--train.loss_chunk_tokens 256"
    if not config.fsdp.cpu_offload:
        return "--fsdp.cpu_offload true (or more GPUs: --gpus-per-node / --nodes)"
    return "more GPUs (--nodes), or --train.stage lora"


def last_gpu_check_mfu() -> float | None:
    path = Path(__file__).resolve().parents[1] / "gpu-check" / "throughput.json"
    if not path.is_file():
        return None
    rows = [r for r in json.loads(path.read_text()).get("rows", []) if "mfu" in r]
    return max(r["mfu"] for r in rows) if rows else None


def steps_per_epoch(config) -> int | None:
    """With local data and a local (or cached) tokenizer: the real tokenization and packing; else unknown."""
    from launch.config import looks_local

    paths = [source.path for source in config.data.sources] or [config.data.path]
    if any(path != "bundled" and not (looks_local(path) and Path(path).exists()) for path in paths):
        return None
    try:
        from backbones import build_backbone
        from launch.data import Mixture, build_data

        backbone = build_backbone(config.model.backbone, path=config.model.path, load_weights=False)
        data, _ = build_data(config.data, backbone, config.run.seed, with_eval=False)
    except OSError:  # no tokenizer offline: the Hub model is neither local nor cached
        return None
    rows = data.dataset.items_per_epoch if isinstance(data.dataset, Mixture) else len(data.dataset)
    return rows // config.train.global_batch_size


def render(result: dict) -> str:
    lines = [f"plan: {result['recipe']['backbone']} {result['recipe']['stage']} on {result['hardware']['nodes']} x "
             f"{result['hardware']['gpus_per_node']} {result['hardware']['gpu']}: {result['verdict']} (peak "
             f"{result['peak_per_gpu_gib']} of {result['hardware']['gpu_memory_gib']} GiB per GPU)"]  # fmt: skip
    lines += [f"  {k:<34} {v:>8.2f} GiB" for k, v in result["memory_per_gpu_gib"].items()]
    if result["first_knob"]:
        lines.append(f"  first knob to turn: {result['first_knob']}")
    lines.append(f"  host RAM (GiB): {result['host_ram']}")
    lines.append(f"  checkpoint {result['checkpoint_gib']} GiB, export {result['export_gib']} GiB")
    wall = result["wall_time_hours"]
    lines.append(f"  {result['tokens_per_step']:,} tokens/step, {result['step_seconds']} s/step at MFU "
                 f"{result['mfu_assumed']:.0%}, steps/epoch {result['steps_per_epoch'] or 'unknown (data not local)'}, "
                 f"wall time {f'{wall} h' if wall else 'unknown'}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)  # peft asks transformers for a deprecated name
    try:
        result = plan(sys.argv[1:] if argv is None else argv)
    except ValueError as error:
        print(f"shardtune plan: {error}", file=sys.stderr)
        return 2
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
