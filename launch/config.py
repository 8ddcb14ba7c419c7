"""Typed run configuration: one dataclass per section; precedence is defaults < recipe YAML < CLI flags.

`parse_config(argv)` accepts `--config recipes/x.yaml` and `--section.key value` overrides (draccus); then
`launch.validate.validate_config` reports every problem at once, naming the bad value, the choices and the flag.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import draccus
import yaml


@dataclass
class ModelConfig:
    """Which backbone, from where, with which attention kernel."""

    backbone: str = "llama2-tiny-chat"  # registry id, see backbones/registry.py
    path: Optional[str] = None  # local directory to load instead of the Hub path
    # auto (flash-attn, else torch_varlen, else sdpa) | flash_attention_2 | torch_varlen | sdpa | eager
    attn_implementation: str = "auto"
    hf_token_file: Optional[str] = None  # file holding a Hub token (HF_TOKEN wins); the token is never saved


@dataclass
class SourceConfig:
    """One source of a mixture (`data.sources`): a file or Hub id with its own format, fields, split and eval data,
    and either a weight (its share of the mixture's tokens) or a number of passes per epoch. Unset fields take the
    data section's values."""

    path: str = ""  # .jsonl/.json/.parquet file, glob, parquet directory, or Hub dataset id
    name: Optional[str] = None  # in metrics (tokens/NAME, eval_loss/NAME) and the summary; default: the file's stem
    weight: Optional[float] = None  # share of the mixture's tokens (normalised over the weighted sources)
    epochs: Optional[float] = None  # or: passes over this source per epoch of the mixture (2: every example twice)
    eval_path: Optional[str] = None  # this source's eval file or Hub id (with eval_split); default: no eval data
    format: Optional[str] = None
    split: Optional[str] = None
    eval_split: Optional[str] = None
    instruction_field: Optional[str] = None
    input_field: Optional[str] = None
    output_field: Optional[str] = None
    messages_field: Optional[str] = None
    text_field: Optional[str] = None


@dataclass
class DataConfig:
    """The SFT data: file or Hub id (or a weighted mixture of several), its format, the fields, length and packing."""

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
    # Peak resident memory of each tokenizing process (the cache is built by up to 8 of them): their batches are sized
    # to stay under it, whatever the dataset's size.
    tokenize_memory_mb: int = 2048
    # A mixture instead of `path`: a list of sources (see SourceConfig), in a recipe as
    #   sources: [{path: chat.jsonl, weight: 0.7}, {path: code.parquet, weight: 0.3}, {path: gold.jsonl, epochs: 2}]
    sources: List[SourceConfig] = field(default_factory=list)


@dataclass
class TrainConfig:
    """The training loop: stage, batch sizes, steps, optimizer, schedule, loss, progress lines."""

    stage: str = "full"  # full | last-layer | lora (see the lora section)
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
    eval_every: int = 0  # steps between evaluations; 0 = only before and after training; -1 = never
    # The head and the loss run over chunks of this many tokens, recomputed in backward, so no [tokens, vocab] fp32
    # logits exist at once: ~12 x chunk x vocab bytes at a time, 98 MB for LLaMA-2 (0: full logits, as transformers).
    loss_chunk_tokens: int = 256
    compile: bool = False  # torch.compile each decoder block (after activation checkpointing, before FSDP)
    # inductor generates kernels (Triton on CUDA, C++ on CPU); aot_eager captures the same graphs forward and backward
    # and runs them eagerly (no codegen: a graph-break or recompile hunt, as torchtitan's compile.backend); eager
    # captures the forward only.
    compile_backend: str = "inductor"
    # Python's cyclic garbage collector runs only every this many steps, on every rank at once (as torchtitan's
    # gc_freq): left automatic, it pauses each rank at its own moments and the others wait at the next collective.
    # 0 = automatic.
    gc_every_steps: int = 50
    # Progress in a log file (not a terminal): a line every log_every_s seconds or log_every_steps steps (0: off).
    log_every_s: float = 10.0
    log_every_steps: int = 0


@dataclass
class LoraSection:
    """LoRA adapters for --train.stage lora, built with peft."""

    rank: int = 16  # r: the adapters' inner dimension
    alpha: float = 32.0  # the update is scaled by alpha / rank
    dropout: float = 0.05  # on the adapters' input
    # module names in the decoder blocks, e.g. [q_proj,v_proj]; empty: every linear layer (as OpenVLA does)
    target_modules: List[str] = field(default_factory=list)
    train_embeddings: bool = False  # also train embed_tokens and lm_head in full (new tokens such as <PAD>)


@dataclass
class FSDPConfig:
    """Sharding, mixed precision, activation checkpointing, CPU offload, gradient accumulation."""

    sharding: str = "full"  # full | grad-op | hybrid | none
    mixed_precision: str = "bf16"  # bf16 (fp32 master weights, fp32 reduction) | fp32
    # none | full (recompute each decoder block in backward) | selective (keep matmul/attention outputs, recompute the
    # rest: most of full's memory saving at a fraction of its recompute)
    activation_checkpointing: str = "none"
    cpu_offload: bool = False  # keep sharded parameters, gradients and optimizer state on the CPU
    # Skip the reduce-scatter on all micro-steps but the last: less communication, but between micro-steps every rank
    # holds unsharded fp32 gradients of the whole model (+4 bytes per parameter: ~27 GB per GPU for 7B, ~52 GB for
    # 13B). Off: gradients stay sharded (reduce-scatter every micro-step; hybrid defers only the cross-node all-reduce).
    unsharded_grad_accumulation: bool = False


@dataclass
class CheckpointConfig:
    """Sharded resumable checkpoints: when, how many, async, and their collective timeout."""

    every_steps: int = 0  # 0 = by time only (every_minutes)
    every_minutes: float = 30.0  # also save when this long has passed since the last save; 0 = by steps only
    keep_last: int = 2  # older complete checkpoints are deleted
    async_save: bool = False  # overlap the write with training (torch.distributed.checkpoint.async_save)
    timeout_s: float = 3600.0  # collective timeout while loading and saving (a 13B save to shared storage is slow)
    # Also keep the best complete checkpoint by this metric, never deleted: eval_loss (lowest) or a generation metric,
    # gen_exact_match or gen_contains (highest). Checkpoints are scored where that evaluation runs at the same step.
    keep_best_by: Optional[str] = None


@dataclass
class RunConfig:
    """The run directory, seed, trackers, overwrite and resume, and the training collective timeout."""

    output_dir: str = "runs/default"
    seed: int = 42
    trackers: List[str] = field(default_factory=lambda: ["jsonl"])  # jsonl (always written) | wandb
    wandb_project: str = "shardtune"
    overwrite: bool = False  # start again in an output_dir that holds a finished run
    resume: str = "auto"  # auto | never | <checkpoint directory>
    # A training collective that does not finish in this time ends the job (a rank stopped responding). Loading and
    # checkpoint saves use --checkpoint.timeout_s instead.
    collective_timeout_s: float = 600.0
    # After rank 0 has waited this long in a step, it logs the step and the ranks it has not heard from (0: off).
    heartbeat_s: float = 60.0
    # A torch.profiler trace per rank of steps A to B (1-based, inclusive), e.g. 3:5, into profile/ (on CUDA also a
    # memory snapshot for pytorch.org/memory_viz); empty: off
    profile_steps: str = ""


@dataclass
class ExportConfig:
    """The Hugging Face export written to final/."""

    dtype: str = "bf16"  # bf16 | fp32: dtype of the Hugging Face export in final/
    max_shard_size_mb: int = 5000  # safetensors files above this are split, with an index


@dataclass
class EvalConfig:
    """Generation evals during training: greedy answers to held-out prompts, scored against their references."""

    generate_every: int = 0  # steps between generation evals (also before training and at the last step); 0: off
    # held-out conversations (a data file in --data.format; each one's last answer is the reference); default: the
    # eval split, or each mixture source's eval data
    generate_path: Optional[str] = None
    generate_count: int = 32  # prompts per eval source: the first ones
    max_new_tokens: int = 64  # decoding also stops at the family's end-of-turn token
    samples: int = 4  # generations logged with each eval (metrics.jsonl, and a wandb table)


@dataclass
class Config:
    """A whole run: one section per stage of the pipeline."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


class ConfigError(ValueError):
    """Bad configuration: every problem found, one per line."""


def field_types() -> dict[str, object]:
    """`section.key` -> the field's type, for every field of every section."""
    types = {}
    for section in dataclasses.fields(Config):
        hints = typing.get_type_hints(section.default_factory)
        for key in dataclasses.fields(section.default_factory):
            types[f"{section.name}.{key.name}"] = hints[key.name]
    return types


# The HF Trainer's (and torchtune's) names for the same things: a user coming from them types these first.
FAMILIAR_NAMES = {
    "learning_rate": "train.lr", "num_train_epochs": "train.epochs", "per_device_train_batch_size":
    "train.micro_batch_size", "batch_size": "train.global_batch_size", "gradient_accumulation_steps":
    "train.global_batch_size", "lr_scheduler_type": "train.schedule", "eval_steps": "train.eval_every",
    "save_steps": "checkpoint.every_steps", "save_total_limit": "checkpoint.keep_last", "gradient_checkpointing":
    "fsdp.activation_checkpointing", "bf16": "fsdp.mixed_precision", "model_name_or_path": "model.path",
    "max_seq_length": "data.max_length", "seq_len": "data.max_length", "logging_steps": "train.log_every_steps",
    "resume_from_checkpoint": "run.resume", "attn_implementation": "model.attn_implementation",
}  # fmt: skip


def text_field(key: str) -> bool:
    """Whether `section.key` holds text (str, or Optional[str])."""
    kind = field_types()[key]
    return kind is str or (typing.get_origin(kind) is typing.Union and str in typing.get_args(kind))


def closest_key(key: str) -> str | None:
    """The valid `section.key` a mistyped one most likely meant: a familiar name from other trainers, else the
    key it abbreviates, else the closest spelling of the whole key, else of its last part."""
    keys = list(field_types())
    name = key.rsplit(".", 1)[-1]
    if name in FAMILIAR_NAMES:
        return FAMILIAR_NAMES[name]
    started = [k for k in keys if k.startswith(key)]
    if len(started) == 1:  # an abbreviation: model.attn -> model.attn_implementation
        return started[0]
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
    if close:
        return close[0]
    by_name = {k.rsplit(".", 1)[-1]: k for k in keys}
    close = difflib.get_close_matches(name, list(by_name), n=1, cutoff=0.6)
    return by_name[close[0]] if close else None


def unknown_key(key: str, where: str = "") -> ConfigError:
    close = [closest_key(key)] if closest_key(key) else []
    hint = f" (did you mean {close[0]}?)" if close else "; see --help for the keys"
    return ConfigError(f"unknown key {key}{where}{hint}")


def check_value(key: str, value: str) -> None:
    """A CLI value that cannot be read as its field's type, refused with the flag and the type expected."""
    kind = field_types()[key]
    if typing.get_origin(kind) is typing.Union:  # Optional[X]
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        if value.lower() in ("null", "none"):
            return
    try:
        if kind is bool:
            if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
                raise ValueError
        elif kind in (int, float):
            kind(value)
        elif typing.get_origin(kind) is list:
            item = typing.get_args(kind)[0]
            parsed = yaml.safe_load(value)
            if not isinstance(parsed, list):
                raise ValueError
            if dataclasses.is_dataclass(item):
                check_sources(parsed, f"--{key}")
            else:
                [item(v) for v in parsed]
    except (ValueError, TypeError, yaml.YAMLError):
        expected = {bool: "true or false", int: "an integer", float: "a number"}.get(kind, f"a {kind}")
        if typing.get_origin(kind) is list:
            expected = f"a list like [{', '.join(['...'] * 2)}] of {typing.get_args(kind)[0].__name__}"
        raise ConfigError(f"--{key}={value} is not valid: expected {expected}") from None


def check_recipe_keys(path: str) -> None:
    try:
        recipe = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"--config {path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if recipe is None:
        raise ConfigError(
            f"--config {path}: the recipe is empty; expected sections (model:, data:, train:, ...), "
            "e.g. copy recipes/tiny-full.yaml"
        )
    if not isinstance(recipe, dict):
        raise ConfigError(
            f"--config {path}: expected sections (model:, data:, train:, ...), found {type(recipe).__name__}"
        )
    for section, values in recipe.items():
        if not isinstance(values, dict):
            raise unknown_key(str(section), f" in {path}")
        for key in values:
            if f"{section}.{key}" not in field_types():
                raise unknown_key(f"{section}.{key}", f" in {path}")
            value = values[key]
            if text_field(f"{section}.{key}") and value is not None and not isinstance(value, str):
                # YAML reads 3:5 as the base-60 integer 185, 1e3 as a float and yes as true
                raise ConfigError(f"{section}.{key}: {value!r} in {path} is not text; quote it, e.g. "
                                  f"{key}: \"...\"")  # fmt: skip
        if section == "data" and values.get("sources") is not None:
            check_sources(values["sources"], f"data.sources in {path}")


SOURCE_KEYS = tuple(f.name for f in dataclasses.fields(SourceConfig))


def check_sources(sources: object, where: str) -> None:
    """`data.sources` is a list of {key: value} with SourceConfig's keys; a mistyped key gets the closest one."""
    if not isinstance(sources, list):
        raise ConfigError(f"{where}: expected a list of sources like [{{path: a.jsonl, weight: 0.7}}, ...]")
    for i, source in enumerate(sources):
        if not isinstance(source, dict):
            raise ConfigError(f"{where}[{i}]: expected {{path: ..., weight: ... or epochs: ...}}, found {source!r}")
        for key in source:
            if key not in SOURCE_KEYS:
                close = difflib.get_close_matches(str(key), SOURCE_KEYS, n=1)
                hint = f" (did you mean {close[0]}?)" if close else f"; a source takes {', '.join(SOURCE_KEYS)}"
                raise ConfigError(f"unknown key {key} in source {i} of {where}{hint}")


def parse_config(argv: list[str]) -> Config:
    """`--config FILE` (alias of draccus' `--config_path`) plus `--section.key value` overrides. A typo'd key or an
    unreadable value is one line naming it (and the closest key), never a parser dump."""
    args, config_paths = list(argv), []
    for flag in ("--config", "--config_path"):
        while flag in args or any(a.startswith(flag + "=") for a in args):
            i = next(i for i, a in enumerate(args) if a == flag or a.startswith(flag + "="))
            if args[i] == flag:
                if i + 1 >= len(args):
                    raise ConfigError(f"{flag} needs a recipe file, e.g. {flag} recipes/tiny-full.yaml")
                config_paths.append(args[i + 1])
                del args[i : i + 2]
            else:
                config_paths.append(args[i].split("=", 1)[1])
                del args[i]
    if len(config_paths) > 1:
        raise ConfigError(f"--config given {len(config_paths)} times ({', '.join(config_paths)}); give one recipe")
    config_path = config_paths[0] if config_paths else None
    if config_path is not None:
        if not Path(config_path).is_file():
            raise ConfigError(f"--config {config_path}: no such recipe file; recipes live in recipes/*.yaml")
        check_recipe_keys(config_path)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}'; flags look like --section.key value (see --help)")
        key, _, value = arg[2:].partition("=")
        if key not in field_types():
            raise unknown_key(key)
        if not value:
            if i + 1 >= len(args):
                raise ConfigError(f"--{key} needs a value")
            value, i = args[i + 1], i + 1
        check_value(key, value)
        if text_field(key) and value.lower() not in ("null", "none"):
            # draccus reads a value as YAML: unquoted, 3:5 would be the base-60 integer 185 and 1e3 a float
            start = i if "=" in arg else i - 1
            args[start : i + 1] = [f"--{key}={json.dumps(value)}"]
            i = start
        i += 1
    try:
        return draccus.parse(Config, config_path=config_path, args=args)
    except (Exception, SystemExit) as error:  # a value draccus cannot decode (e.g. in the recipe)
        raise ConfigError(f"invalid configuration: {str(error).strip().splitlines()[-1]}") from None


def config_to_dict(config: Config) -> dict:
    """The resolved config as plain values (trackers, digests). Secrets are never fields, but may hide in a value
    (a path): trackers get the masked tree (launch/secrets.py)."""
    return dataclasses.asdict(config)


def dump_config(config: Config) -> str:
    """The resolved config as YAML, every secret masked (tokens come from HF_TOKEN or a file, but a value such as a
    path may still hold one)."""
    from launch.secrets import redact

    stream = io.StringIO()
    draccus.dump(config, stream)
    return redact(stream.getvalue())


def profile_range(text: str) -> tuple[int, int] | None:
    """--run.profile_steps "A:B" -> (A, B); "" -> None. ValueError for anything else."""
    if not text.strip():
        return None
    first, sep, last = text.partition(":")
    a, b = int(first), int(last if sep else first)
    if not 1 <= a <= b:
        raise ValueError(text)
    return a, b


def has_eval_data(data: DataConfig) -> bool:
    """Whether the run has held-out data: an eval path, the bundled eval split, or a source's eval path."""
    if data.sources:
        return any(source.eval_path for source in data.sources)
    return data.eval_path is not None or data.path == "bundled"


def source_name(source: SourceConfig) -> str:
    """A source's name in metrics and the summary: its own, else its file's stem (a Hub id's last part)."""
    if source.name:
        return source.name
    parts = [part for part in source.path.rstrip("/").split("/") if part]
    tail = parts[-1] if parts else "source"
    if "*" in tail:  # a glob: its prefix (shard-*.parquet -> shard), else the directory's name (chat/*.jsonl -> chat)
        tail = tail.split("*")[0].rstrip("-_.") or (parts[-2] if len(parts) > 1 else "source")
    for suffix in (".jsonl", ".json", ".parquet"):
        tail = tail.removesuffix(suffix)
    return tail or "source"


def source_data(data: DataConfig, source: SourceConfig) -> DataConfig:
    """The data section as one source sees it: its path and eval path, and its own values where it sets them."""
    mixture_keys = ("path", "name", "weight", "epochs", "eval_path")
    own = {f.name: getattr(source, f.name) for f in dataclasses.fields(SourceConfig)
           if f.name not in mixture_keys and getattr(source, f.name) is not None}  # fmt: skip
    return dataclasses.replace(data, path=source.path, eval_path=source.eval_path, sources=[], **own)


def looks_local(path: str) -> bool:
    """A data-file suffix, a glob or a path-like start means a local path; anything else is a Hub dataset id."""
    return path.endswith((".jsonl", ".json", ".parquet")) or "*" in path or path.startswith(("/", "./", "../", "~"))
