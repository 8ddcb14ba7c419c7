"""Every check of a run's inputs that needs no process group and writes nothing: values, choices, paths, the output
directory and the model directory. All problems are reported at once, each naming the value, the choices and the flag.
"""

from __future__ import annotations

import glob
import logging
import math
import os
from pathlib import Path

from backbones.registry import BACKBONES
from launch.attention import IMPLEMENTATIONS
from launch.config import Config, ConfigError, LoraSection, has_eval_data, looks_local, profile_range, source_name

CHOICES = {
    ("model", "attn_implementation"): IMPLEMENTATIONS,
    ("data", "format"): ("alpaca", "chat", "text"),
    ("data", "overlong"): ("truncate", "drop"),
    ("train", "stage"): ("full", "last-layer", "lora"),
    ("train", "schedule"): ("cosine", "constant"),
    ("train", "compile_backend"): ("inductor", "aot_eager", "eager"),
    ("fsdp", "sharding"): ("full", "grad-op", "hybrid", "none"),
    ("fsdp", "mixed_precision"): ("bf16", "fp32"),
    ("fsdp", "activation_checkpointing"): ("none", "full", "selective"),
    ("export", "dtype"): ("bf16", "fp32"),
}


def validate_config(config: Config, world_size: int | None = None, check_paths: bool = True) -> None:
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
        if check_paths and path and path != "bundled" and looks_local(path) and not local_data_exists(path):
            problems.append(f"--data.{key}={path}: no such file" + (" matches the pattern" if "*" in path else ""))
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
    problems += stage_problems(config) + size_problems(config) + mixture_problems(config, check_paths)
    problems += eval_problems(config, check_paths)
    problems += optimizer_problems(config) + (
        path_problems(config) + accelerate_problems(config) if check_paths else []
    )
    if len(problems) == 1:
        raise ConfigError(f"invalid configuration: {problems[0]}")
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def stage_problems(config: Config) -> list[str]:
    """Settings that would be silently ignored by the chosen stage: a --lora.* value that is not the default on any
    stage but lora."""
    if config.train.stage == "lora":
        return []
    defaults = LoraSection()
    return [f"--lora.{key}={getattr(config.lora, key)} applies to --train.stage lora only, and the stage is "
            f"{config.train.stage}; drop it, or choose --train.stage lora"
            for key in vars(defaults) if getattr(config.lora, key) != getattr(defaults, key)]  # fmt: skip


def size_problems(config: Config) -> list[str]:
    """Sizes that cannot mean what they say (a shard of 0 MB would write one file per tensor)."""
    problems = []
    if config.export.max_shard_size_mb < 1:
        problems.append(f"--export.max_shard_size_mb={config.export.max_shard_size_mb} would write one file per "
                        "tensor; use >= 1 (the default, 5000, is Hugging Face's)")  # fmt: skip
    if config.data.tokenize_memory_mb < 512:
        problems.append(f"--data.tokenize_memory_mb={config.data.tokenize_memory_mb} is below what a tokenizing "
                        "process needs for its libraries alone; use >= 512 (default 2048)")  # fmt: skip
    run = config.run
    if not (math.isfinite(run.heartbeat_s) and run.heartbeat_s >= 0):
        problems.append(f"--run.heartbeat_s={run.heartbeat_s} must be >= 0 (0: off)")
    train = config.train
    if not (math.isfinite(train.log_every_s) and train.log_every_s >= 0) or train.log_every_steps < 0:
        problems.append(f"--train.log_every_s={train.log_every_s} and --train.log_every_steps="
                        f"{train.log_every_steps} must be >= 0 (0: off)")  # fmt: skip
    if not positive(config.checkpoint.timeout_s):
        problems.append(f"--checkpoint.timeout_s={config.checkpoint.timeout_s} must be > 0")
    return problems


def mixture_problems(config: Config, check_paths: bool = True) -> list[str]:
    """data.sources: each source a path with a weight or an epoch count (not both), unique names, known formats."""
    data, problems = config.data, []
    if not data.sources:
        return []
    if data.path != "bundled" or data.eval_path is not None:
        problems.append(f"data.sources and --data.path={data.path}"
                        f"{f' / --data.eval_path={data.eval_path}' if data.eval_path else ''} both name training "
                        "data; give the sources (each with its own eval_path), or one --data.path")  # fmt: skip
    names: dict[str, int] = {}
    for i, source in enumerate(data.sources):
        where = f"data.sources[{i}]"
        if not source.path.strip():
            problems.append(f"{where}: path is empty; give a file, glob, parquet directory or Hub dataset id")
            continue
        given = [key for key in ("weight", "epochs") if getattr(source, key) is not None]
        if len(given) != 1:
            problems.append(f"{where} ({source.path}): give either weight (a share of the mixture's tokens) or epochs "
                            f"(passes per epoch), {'not both' if given else 'one of them'}")  # fmt: skip
        for key in given:
            if not positive(getattr(source, key)):
                problems.append(f"{where}.{key}={getattr(source, key)} must be a positive number")
        if source.format is not None and source.format not in CHOICES[("data", "format")]:
            problems.append(f"{where}.format={source.format} is not valid; choose one of "
                            f"{', '.join(CHOICES[('data', 'format')])}")  # fmt: skip
        for key in ("path", "eval_path"):
            path = getattr(source, key)
            if check_paths and path and looks_local(path) and not local_data_exists(path):
                problems.append(f"{where}.{key}={path}: no such file" + (" matches the pattern" if "*" in path else ""))
        name = source_name(source)
        if name in names:
            problems.append(f"{where} and data.sources[{names[name]}] are both named '{name}'; give each a name")
        elif not all(c.isalnum() or c in "-_." for c in name):
            problems.append(f"{where}.name={name}: use letters, digits, '-', '_' or '.' (it names metrics)")
        names.setdefault(name, i)
    return problems


BEST_BY = {"eval_loss": "lowest", "gen_exact_match": "highest", "gen_contains": "highest"}


def eval_problems(config: Config, check_paths: bool = True) -> list[str]:
    """Generation evals, the best-checkpoint metric and the profiler's steps."""
    ev, problems = config.eval, []
    if ev.generate_every < 0 or ev.generate_count < 1 or ev.max_new_tokens < 1 or ev.samples < 0:
        problems.append(f"--eval.generate_every={ev.generate_every} must be >= 0 (0: off), --eval.generate_count="
                        f"{ev.generate_count} and --eval.max_new_tokens={ev.max_new_tokens} >= 1, --eval.samples="
                        f"{ev.samples} >= 0")  # fmt: skip
    held_out = ev.generate_path is not None or has_eval_data(config.data)
    if ev.generate_every > 0 and not held_out:
        problems.append(f"--eval.generate_every={ev.generate_every} needs held-out prompts: give --eval.generate_path "
                        "FILE, or eval data (--data.eval_path, or eval_path on a source)")  # fmt: skip
    if check_paths and ev.generate_path and looks_local(ev.generate_path) and not local_data_exists(ev.generate_path):
        problems.append(f"--eval.generate_path={ev.generate_path}: no such file")
    best = config.checkpoint.keep_best_by
    if best is not None:
        every = {"eval_loss": config.train.eval_every}.get(best, ev.generate_every)
        flag = "--train.eval_every" if best == "eval_loss" else "--eval.generate_every"
        saves = config.checkpoint.every_steps
        if best not in BEST_BY:
            problems.append(f"--checkpoint.keep_best_by={best} is not valid; choose one of {', '.join(BEST_BY)}")
        elif best == "eval_loss" and (every < 0 or not has_eval_data(config.data)):
            problems.append("--checkpoint.keep_best_by=eval_loss needs evaluations: eval data (--data.eval_path) and "
                            "--train.eval_every >= 0")  # fmt: skip
        elif best != "eval_loss" and every <= 0:
            problems.append(f"--checkpoint.keep_best_by={best} needs generation evals: --eval.generate_every N")
        elif saves and every and saves % every:
            problems.append(f"--checkpoint.keep_best_by={best} scores the checkpoints saved where an evaluation runs: "
                            f"make --checkpoint.every_steps={saves} a multiple of {flag}={every}")  # fmt: skip
    try:
        profile_range(config.run.profile_steps)
    except ValueError:
        problems.append(f"--run.profile_steps={config.run.profile_steps} is not valid: give A:B, the first and last "
                        "step to trace (1-based, A <= B), e.g. 3:5")  # fmt: skip
    return problems


def local_data_exists(path: str) -> bool:
    expanded = str(Path(path).expanduser())
    return bool(glob.glob(expanded)) if "*" in path else Path(expanded).exists()


def positive(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def optimizer_problems(config: Config) -> list[str]:
    train, problems = config.train, []
    if not positive(train.lr):
        problems.append(f"--train.lr={train.lr} must be a positive number (e.g. 2e-5)")
    if len(train.betas) != 2 or not all(math.isfinite(b) and 0 <= b < 1 for b in train.betas):
        problems.append(f"--train.betas={train.betas} must be two numbers in [0, 1), e.g. [0.9,0.95]")
    if not (math.isfinite(train.weight_decay) and train.weight_decay >= 0):
        problems.append(f"--train.weight_decay={train.weight_decay} must be >= 0")
    if not (math.isfinite(train.max_grad_norm) and train.max_grad_norm >= 0):
        problems.append(f"--train.max_grad_norm={train.max_grad_norm} must be >= 0 (0 disables clipping)")
    if train.eval_every < -1:
        problems.append(
            f"--train.eval_every={train.eval_every} is not valid: choose N > 0 (every N steps), 0 (only "
            "before and after training) or -1 (never)"
        )
    if train.gc_every_steps < 0:
        problems.append(
            f"--train.gc_every_steps={train.gc_every_steps} must be >= 0 (0: Python's automatic collection)"
        )
    lora = config.lora
    if lora.rank < 1 or not positive(lora.alpha) or not 0 <= lora.dropout < 1:
        problems.append(f"--lora.rank={lora.rank} must be >= 1, --lora.alpha={lora.alpha} > 0 and "
                        f"--lora.dropout={lora.dropout} in [0, 1)")  # fmt: skip
    if not positive(config.run.collective_timeout_s):
        problems.append(f"--run.collective_timeout_s={config.run.collective_timeout_s} must be > 0")
    if not (math.isfinite(config.checkpoint.every_minutes) and config.checkpoint.every_minutes >= 0):
        problems.append(f"--checkpoint.every_minutes={config.checkpoint.every_minutes} must be >= 0 (0: off)")
    return problems


def path_problems(config: Config) -> list[str]:
    """The output directory must be creatable and writable; a local model directory must hold a model."""
    problems, out = [], config.run.output_dir
    if not out.strip():
        problems.append("--run.output_dir is empty; give a directory for the run")
    else:
        path = Path(out).expanduser()
        if path.exists() and not path.is_dir():
            problems.append(f"--run.output_dir={out} is a file; give a directory")
        else:
            existing = next(p for p in (path, *path.parents) if p.exists())
            if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
                problems.append(f"--run.output_dir={out}: {existing} is not writable; choose another directory")
    if config.model.path is not None:
        problems += model_dir_problems(config.model.path)
    return problems


def model_dir_problems(path: str) -> list[str]:
    """What a local model directory lacks (config.json, a tokenizer, safetensors weights)."""
    flag = f"--model.path={path}"
    directory = Path(path).expanduser()
    if not path.strip():
        return ["--model.path is empty; give a local model directory, or leave it out to use the Hub path"]
    if not directory.is_dir():
        return [f"{flag}: no such directory; give a local model directory (config.json, *.safetensors, tokenizer)"]
    missing = []
    if not (directory / "config.json").is_file():
        missing.append("config.json")
    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        missing.append("a tokenizer (tokenizer.json or tokenizer.model)")
    if not list(directory.glob("*.safetensors")):
        missing.append("weights (*.safetensors)")
    return [f"{flag} lacks {', '.join(missing)}; is it a Hugging Face model directory?"] if missing else []


def accelerate_problems(config: Config) -> list[str]:
    """`accelerate launch` sets the same environment as torchrun, with two traps: its CPU launcher starts one process
    whatever --num_processes says (it needs --multi_gpu), and its --mixed_precision means nothing to shardtune."""
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if precision is None:
        return []
    if precision not in ("no", config.fsdp.mixed_precision):
        logging.getLogger(__name__).warning(
            "accelerate's --mixed_precision=%s is not used: shardtune computes in --fsdp.mixed_precision=%s (over fp32 "
            "master weights, reducing gradients in fp32)", precision, config.fsdp.mixed_precision)  # fmt: skip
    if "WORLD_SIZE" not in os.environ and "MASTER_ADDR" in os.environ:
        return ["accelerate launch was asked for several processes but started one (without --multi_gpu it starts "
                "one); use: accelerate launch --multi_gpu --num_processes N -m launch.train ... (on a machine without "
                "GPUs too: it then starts N CPU processes)"]  # fmt: skip
    return []
