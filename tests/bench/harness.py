"""Build-and-step harness for benchmarks and GPU tests: a LLaMA-2-shaped model from a shape dict (random init, no
weights on disk), sharded and trained through shardtune's own functions (apply_parallelism, Trainer.train_step) on
synthetic packed data, with tokens/s, TFLOP/s, MFU and peak memory measured around it."""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from fsdp import DistEnv, apply_parallelism, build_mesh
from fsdp.materialize import materialize
from launch.config import TrainConfig
from launch.data import IGNORE_INDEX, GlobalBatchSampler, TokenizedData, batch_layout, pack
from launch.data.cache import write_entry
from launch.flops import FlopCounter, build_flop_counter, peak_bf16_flops
from launch.metrics import MetricsWriter
from launch.optim import build_optimizer, build_schedule, decay_parameter_names
from launch.trainer import Trainer

# A LLaMA-2-shaped ~1.1B model (TinyLlama's shape with LLaMA-2's vocabulary + <PAD>, padded to 64).
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)  # fmt: skip
# Llama-3.2-1B's published config: grouped-query heads, a 128k vocabulary, llama3 RoPE scaling, tied embeddings.
LLAMA32_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                  rope_theta=500000.0, tie_word_embeddings=True,
                  rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192})  # fmt: skip
# Small enough for a CPU smoke of the harness itself; the second one tied, as Llama-3.2 is.
TINY_SHAPE = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=512)  # fmt: skip
SHAPES = {"llama2-1.1b": LLAMA_1B, "llama3.2-1b": LLAMA32_1B, "tiny": TINY_SHAPE,
          "tiny-llama3": {**TINY_SHAPE, "num_key_value_heads": 1, "tie_word_embeddings": True,
                          "rope_scaling": LLAMA32_1B["rope_scaling"], "rope_theta": 500000.0}}  # fmt: skip


@dataclass
class Variant:
    attn: str = "sdpa"
    activation_checkpointing: str = "none"  # none | full | selective
    mixed_precision: str = "bf16"
    cpu_offload: bool = False
    stage: str = "full"
    compile: bool = False
    loss_chunk_tokens: int = 256  # 0: full logits


def synthetic_packed(vocab: int, max_length: int, rows: int, seed: int = 0) -> TokenizedData:
    """Packed rows of random examples with SFT-like lengths (64 to max_length / 2 tokens), answers supervised."""
    rng = random.Random(seed)
    examples, total = [], 0
    while total < rows * max_length:
        n = rng.randint(64, max_length // 2)
        ids = [1] + [rng.randrange(3, vocab - 1) for _ in range(n - 1)]
        examples.append((ids, [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]))
        total += n
    entry = Path(tempfile.mkdtemp(prefix="synthetic-packed-"))
    return pack(write_entry(entry, examples), max_length, vocab - 1, False, 0)


def build_model(shape: dict, env: DistEnv, variant: Variant) -> tuple[torch.nn.Module, FlopCounter, set[str]]:
    """Meta -> stage -> FLOP count -> shard -> materialise -> random init, as launch.train does minus the weights."""
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**shape, attn_implementation=variant.attn, use_cache=False))
    model.requires_grad_(variant.stage == "full")
    if variant.stage == "last-layer":
        for module in (model.model.embed_tokens, model.model.layers[-1], model.lm_head):
            module.requires_grad_(True)
    flops = build_flop_counter(model)
    decay = decay_parameter_names(model)
    apply_parallelism(
        model,
        LlamaDecoderLayer,
        build_mesh(env, "full"),
        param_dtype=torch.bfloat16 if variant.mixed_precision == "bf16" else None,
        activation_checkpointing=variant.activation_checkpointing,
        cpu_offload=variant.cpu_offload,
        compile="inductor" if variant.compile else None,
    )
    materialize(model, env.device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            local = param.to_local()
            local.fill_(1.0) if "norm" in name else local.normal_(0.0, 0.02)
        for module in model.modules():
            if module._non_persistent_buffers_set:
                model._init_weights(module)  # rotary inv_freq
    return model, flops, decay


def build_trainer(
    model,
    flops: FlopCounter,
    decay: set[str],
    env: DistEnv,
    data: TokenizedData,
    attn: str,
    micro_batch: int,
    global_batch: int,
    steps: int,
    variant: Variant | None = None,
) -> Trainer:
    variant = variant or Variant(attn=attn)
    train = TrainConfig(global_batch_size=global_batch, micro_batch_size=micro_batch, lr=1e-5, warmup_ratio=0.0,
                        max_steps=steps, compile=variant.compile,
                        loss_chunk_tokens=variant.loss_chunk_tokens)  # fmt: skip
    optimizer = build_optimizer(model, decay, train)
    sampler = GlobalBatchSampler(len(data.dataset), global_batch, seed=0)
    metrics = MetricsWriter(Path(tempfile.mkdtemp()), [], {}, False, "")
    peak = peak_bf16_flops(torch.cuda.get_device_name(env.device)) if env.device.type == "cuda" else None
    return Trainer(train, env, model, optimizer, build_schedule(optimizer, train, steps), sampler, steps, data, {},
                   0, metrics, batch_layout(data.packed, attn), flops, peak)  # fmt: skip


def measure(trainer: Trainer, warmup: int, timed: int) -> dict:
    """Median-free, honest numbers: `warmup` untimed steps, then `timed` steps between two synchronisations."""
    cuda = trainer.env.device.type == "cuda"
    for _ in range(warmup):
        trainer.train_step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        static = torch.cuda.memory_allocated(trainer.env.device)  # weights and optimizer state between steps
    start, tokens, flops = time.perf_counter(), 0, 0.0
    for _ in range(timed):
        record = trainer.train_step()
        tokens += record["input_tokens"]
        flops += record.get("tflops", 0.0) * record["step_time_s"] * 1e12 * trainer.env.world_size
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    result = {"tokens_per_s": tokens / elapsed, "tflops": flops / elapsed / trainer.env.world_size / 1e12,
              "step_time_s": elapsed / timed, "loss": record["loss"]}  # fmt: skip
    if trainer.peak_flops:
        result["mfu"] = flops / elapsed / (trainer.peak_flops * trainer.env.world_size)
    if cuda:
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(trainer.env.device) / 2**30
        result["static_memory_gib"] = static / 2**30
    return result
