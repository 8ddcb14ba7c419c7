"""Typed run configuration: one dataclass per section; precedence is defaults < recipe YAML < CLI flags.

`parse_config(argv)` accepts `--config recipes/x.yaml` and `--section.key value` overrides (draccus), then
`validate_config` reports every problem at once, naming the bad value, the valid choices and the flag.
"""

from __future__ import annotations

import dataclasses
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import draccus

from backbones.registry import BACKBONES
from launch.attention import IMPLEMENTATIONS


@dataclass
class ModelConfig:
    backbone: str = "llama2-tiny-chat"  # registry id, see backbones/registry.py
    path: Optional[str] = None  # local directory to load instead of the Hub path
    # auto (flash-attn, else torch_varlen, else sdpa) | flash_attention_2 | torch_varlen | sdpa | eager
    attn_implementation: str = "auto"
    hf_token_file: Optional[str] = None  # file holding a Hub token (HF_TOKEN wins); the token is never saved


@dataclass
class DataConfig:
    path: str = "bundled"  # .jsonl/.json/.parquet file, a Hub dataset id, or `bundled`
    eval_path: Optional[str] = None  # eval file or Hub id; `bundled` data brings its own eval split
    format: str = "chat"  # alpaca | chat | text
    split: str = "train"  # Hub datasets only
    eval_split: str = "test"  # Hub datasets only
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    messages_field: str = "messages"
    text_field: str = "text"
    max_length: int = 512  # tokens per example (or per packed row)
    overlong: str = "truncate"  # truncate | drop
    packing: bool = False  # pack examples into rows of max_length, attention kept within each example


@dataclass
class TrainConfig:
    stage: str = "full"  # full | last-layer
    global_batch_size: int = 16  # examples (or packed rows) per optimizer step, over all ranks
    micro_batch_size: int = 4  # per rank per forward/backward
    max_steps: int = 0  # optimizer steps; 0 = run `epochs` epochs
    epochs: int = 1
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_ratio: float = 0.03
    schedule: str = "cosine"  # cosine (linear warmup + cosine decay to 0) | constant (after warmup)
    max_grad_norm: float = 1.0  # 0 disables clipping
    eval_every: int = 0  # steps between evaluations; 0 = only before and after training


@dataclass
class FSDPConfig:
    sharding: str = "full"  # full | grad-op | hybrid | none
    mixed_precision: str = "bf16"  # bf16 (fp32 master weights, fp32 reduction) | fp32
    activation_checkpointing: bool = False  # recompute each decoder layer in backward
    cpu_offload: bool = False  # keep sharded parameters, gradients and optimizer state on the CPU
    # Skip the reduce-scatter on all micro-steps but the last: less communication, but between micro-steps every rank
    # holds unsharded fp32 gradients of the whole model (+4 bytes per parameter: ~27 GB per GPU for 7B, ~52 GB for
    # 13B). Off: gradients stay sharded (reduce-scatter every micro-step; hybrid defers only the cross-node all-reduce).
    unsharded_grad_accumulation: bool = False


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0 = no periodic checkpoints
    keep_last: int = 2  # older complete checkpoints are deleted
    async_save: bool = False  # overlap the write with training (torch.distributed.checkpoint.async_save)


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    seed: int = 42
    trackers: List[str] = field(default_factory=lambda: ["jsonl"])  # jsonl (always written) | wandb
    wandb_project: str = "shardtune"
    overwrite: bool = False  # start again in an output_dir that holds a finished run
    resume: str = "auto"  # auto | never | <checkpoint directory>


@dataclass
class ExportConfig:
    dtype: str = "bf16"  # bf16 | fp32: dtype of the Hugging Face export in final/
    max_shard_size_mb: int = 5000  # safetensors files above this are split, with an index


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


class ConfigError(ValueError):
    """Bad configuration: every problem found, one per line."""


def parse_config(argv: list[str]) -> Config:
    """`--config FILE` (alias of draccus' `--config_path`) plus `--section.key value` overrides."""
    args = list(argv)
    config_path = None
    for flag in ("--config", "--config_path"):
        for i, arg in enumerate(args):
            if arg == flag and i + 1 < len(args):
                config_path = args[i + 1]
                del args[i : i + 2]
                break
            if arg.startswith(flag + "="):
                config_path = arg.split("=", 1)[1]
                del args[i]
                break
    if config_path is not None and not Path(config_path).is_file():
        raise ConfigError(f"--config {config_path}: no such recipe file; recipes live in recipes/*.yaml")
    return draccus.parse(Config, config_path=config_path, args=args)


def config_to_dict(config: Config) -> dict:
    """The resolved config as plain values (trackers, digests). Secrets are never fields."""
    return dataclasses.asdict(config)


def dump_config(config: Config) -> str:
    """The resolved config as YAML. Secrets are never fields (tokens come from HF_TOKEN or a file path)."""
    stream = io.StringIO()
    draccus.dump(config, stream)
    return stream.getvalue()


CHOICES = {
    ("model", "attn_implementation"): IMPLEMENTATIONS,
    ("data", "format"): ("alpaca", "chat", "text"),
    ("data", "overlong"): ("truncate", "drop"),
    ("train", "stage"): ("full", "last-layer"),
    ("train", "schedule"): ("cosine", "constant"),
    ("fsdp", "sharding"): ("full", "grad-op", "hybrid", "none"),
    ("fsdp", "mixed_precision"): ("bf16", "fp32"),
    ("export", "dtype"): ("bf16", "fp32"),
}


def validate_config(config: Config, world_size: int | None = None) -> None:
    """Raise ConfigError listing every problem; needs no process group (world size comes from the environment)."""
    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    problems: list[str] = []
    for (section, key), choices in CHOICES.items():
        value = getattr(getattr(config, section), key)
        if value not in choices:
            problems.append(f"--{section}.{key}={value} is not valid; choose one of {', '.join(choices)}")
    if config.model.backbone not in BACKBONES:
        problems.append(
            f"--model.backbone={config.model.backbone} is unknown; valid ids: {', '.join(sorted(BACKBONES))}"
        )
    else:
        limit = BACKBONES[config.model.backbone].llm_max_length
        if config.data.max_length > limit:
            problems.append(
                f"--data.max_length={config.data.max_length} exceeds {config.model.backbone}'s context of "
                f"{limit} tokens; choose a value <= {limit}"
            )
    train = config.train
    for key in ("global_batch_size", "micro_batch_size"):
        if getattr(train, key) < 1:
            problems.append(f"--train.{key}={getattr(train, key)} must be >= 1")
    if train.global_batch_size >= 1 and train.micro_batch_size >= 1:
        per_step = world_size * train.micro_batch_size
        if train.global_batch_size % per_step:
            problems.append(
                f"--train.global_batch_size={train.global_batch_size} is not divisible by world size {world_size} x "
                f"--train.micro_batch_size={train.micro_batch_size} = {per_step}; choose a global batch that is a "
                f"multiple of {per_step} or a micro-batch size that divides "
                f"{train.global_batch_size // world_size or 1}"
            )
    if train.max_steps < 0 or (train.max_steps == 0 and train.epochs < 1):
        problems.append(
            f"--train.max_steps={train.max_steps} / --train.epochs={train.epochs}: give max_steps > 0 or epochs >= 1"
        )
    if not 0 <= train.warmup_ratio < 1:
        problems.append(f"--train.warmup_ratio={train.warmup_ratio} must be in [0, 1)")
    if config.data.max_length < 8:
        problems.append(f"--data.max_length={config.data.max_length} is too small; use at least 8")
    for key in ("path", "eval_path"):
        path = getattr(config.data, key)
        if path and path != "bundled" and looks_local(path) and not Path(path).exists():
            problems.append(f"--data.{key}={path}: no such file")
    if config.data.path == "bundled" and config.data.format not in ("alpaca", "chat"):
        problems.append(f"--data.format={config.data.format}: bundled data comes as alpaca or chat; give --data.path")
    for tracker in config.run.trackers:
        if tracker not in ("jsonl", "wandb"):
            problems.append(f"--run.trackers contains '{tracker}'; valid trackers: jsonl, wandb")
    if config.fsdp.sharding == "hybrid" and world_size > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        if world_size % local:
            problems.append(f"--fsdp.sharding=hybrid needs equal processes per node; world {world_size}, local {local}")
    if config.checkpoint.every_steps < 0 or config.checkpoint.keep_last < 1:
        problems.append("--checkpoint.every_steps must be >= 0 and --checkpoint.keep_last >= 1")
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def looks_local(path: str) -> bool:
    """A path with a data-file suffix or a path separator that exists locally is a file, else a Hub dataset id."""
    return path.endswith((".jsonl", ".json", ".parquet")) or path.startswith(("/", "./", "../", "~"))
