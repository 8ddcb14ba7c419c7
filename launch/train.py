"""shardtune's entry point: fine-tune a LLaMA-2-family model with FSDP2.

    python -m launch.train --config recipes/tiny-full.yaml                       # one process (CPU or one GPU)
    torchrun --nproc_per_node 2 -m launch.train --config recipes/tiny-full.yaml  # 2 processes (gloo on CPU)
    torchrun --nproc_per_node 8 -m launch.train --config recipes/llama2-7b-chat-full.yaml --train.lr 1e-5
    srun torchrun --nnodes $N --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HEAD:29500 -m launch.train ...

Precedence: dataclass defaults < recipe YAML < CLI flags. Reads top to bottom like the recipe:
parse -> build backbone -> build data -> pick checkpoint -> init distributed -> shard + load -> fit -> export.
"""

from __future__ import annotations

import os
import signal
import sys

EARLY_SIGNALS: list[int] = []  # SIGTERM/SIGUSR1 received while importing: main() treats them as a preemption

if __name__ == "__main__":
    # While torch and transformers import (seconds), before main() installs the handler that checkpoints: Ctrl-C
    # leaves with one line, not a KeyboardInterrupt traceback; SIGTERM/SIGUSR1 are remembered, not fatal (torchrun
    # sends SIGTERM to the other workers as soon as one exits, e.g. with a refusal every rank is about to reach).
    signal.signal(signal.SIGINT, lambda *_: (print("shardtune: interrupted during start-up; nothing was written",
                                                   file=sys.stderr, flush=True), os._exit(130)))  # fmt: skip
    for _signal in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(_signal, lambda signum, _frame: EARLY_SIGNALS.append(signum))

if __name__ == "__main__" and any(arg in ("-h", "--help") for arg in sys.argv[1:]):
    # Before the imports below (torch, transformers: seconds): --help answers at once.
    from launch.help import print_help

    sys.exit(print_help())

import contextlib
import copy
import dataclasses
import gc
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from backbones import HFCausalLLMBackbone, build_backbone
from backbones.base import save_chat_tokenizer
from backbones.lora import LoraSettings
from backbones.weights import WeightsError
from fsdp import (
    DistEnv,
    apply_parallelism,
    barrier,
    broadcast_object,
    build_mesh,
    init_distributed,
    is_rank0,
    read_env,
    teardown,
)
from fsdp.checkpoint import CheckpointError, CheckpointManager, SavePolicy, read_checkpoint_meta
from fsdp.dist import all_gather_object, collective_failure, set_collective_timeout
from fsdp.export import ExportError, model_tensor_sources
from fsdp.materialize import materialize
from launch.attention import AttentionError, resolve_attn_implementation
from launch.config import Config, ConfigError, config_to_dict, dump_config, parse_config, profile_range
from launch.data import (
    DataError,
    GlobalBatchSampler,
    Mixture,
    TokenizedData,
    TokenizingStopped,
    batch_layout,
    build_data,
    build_tokenized,
)
from launch.export import export_model
from launch.flops import build_flop_counter, peak_bf16_flops
from launch.generation import GenerationEval, held_out
from launch.lifecycle import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PREEMPTED,
    tell_the_launcher,
    watch_launcher,
)
from launch.metrics import MetricsWriter, setup_logging
from launch.optim import build_optimizer, build_schedule, decay_parameter_names
from launch.preemption import PreemptionHandler, write_marker
from launch.profiling import StepProfiler
from launch.record import peak_memory_gib, write_run_record, write_summary
from launch.rundir import (
    RunDirError,
    RunDirLock,
    check_run_dir,
    clean_leftovers,
    set_aside_earlier_records,
    start_run,
)
from launch.secrets import redact, register_token_file, scrub_directory
from launch.stage import apply_stage, lora_settings, lora_target_problems
from launch.step_end import StepEnd, Stopped
from launch.trainer import Trainer
from launch.validate import BEST_BY, validate_config

log = logging.getLogger("launch.train")


@dataclass
class Prepared:
    """Everything built before the process group starts."""

    config: Config
    backbone: HFCausalLLMBackbone
    train_data: TokenizedData
    eval_data: dict[str, TokenizedData]  # by source name ("" for --data.path's eval split)
    attn: str
    hf_extras: Callable[[Path], None]  # writes config, generation config and tokenizer of an HF directory
    checkpoints: CheckpointManager
    resume_from: Path | None
    replace_finished: bool  # --run.overwrite over a finished run: removed once this run starts training
    lora: LoraSettings | None  # for --train.stage lora
    held_out: dict[str, TokenizedData] = dataclasses.field(default_factory=dict)  # generation evals' prompts


BAD_INPUT = (ConfigError, RunDirError, AttentionError, DataError, CheckpointError, WeightsError, OSError)


class RunFailed(Exception):
    """The run cannot go on (a stalled or failed collective); the message names the step."""


def prepare(argv: list[str], env: DistEnv, should_stop: Callable[[], bool] = lambda: False) -> Prepared:
    """Everything that can be refused, checked identically on every rank before any process group exists and before
    anything is written: a bad run exits at once on all ranks instead of leaving some waiting in a collective.
    `should_stop()` turning true (a signal) stops a long tokenization between parts (TokenizingStopped)."""
    config = parse_config(argv)
    register_token_file(config.model.hf_token_file)  # masked from here on, wherever it occurs
    validate_config(config, env.world_size)
    check_run_dir(config.run.output_dir, config.run.overwrite, config.run.resume)
    attn, attn_line = resolve_attn_implementation(
        config.model.attn_implementation, env.device, config.fsdp.mixed_precision
    )
    log.info(attn_line)
    # build: the backbone on `meta`, once (tokenizer, config, module tree; the weights come after sharding)
    model = config.model
    backbone = build_backbone(
        model.backbone, path=model.path, hf_token_file=model.hf_token_file, attn_implementation=attn, load_weights=False
    )
    backbone.check_weights()  # a local directory's safetensors headers: truncated or malformed files, by name
    lora = lora_settings(config, backbone.linear_layer_names, backbone.tied_embeddings)
    if problems := lora_target_problems(backbone, lora):
        raise ConfigError(f"invalid configuration: {problems[0]}")
    # data: tokenized through the backbone's prompt builder (cached; every rank reads the same files)
    generating, prompts_file = config.eval.generate_every > 0, config.eval.generate_path
    with_eval = config.train.eval_every >= 0 or (generating and prompts_file is None)
    train_data, eval_data = build_data(config.data, backbone, config.run.seed, with_eval, should_stop)
    check_fills_a_batch(train_data, config)
    held_out = eval_data if generating else {}
    if generating and prompts_file is not None:
        prompts = dataclasses.replace(config.data, eval_path=prompts_file, sources=[])
        held_out = {"": build_tokenized(prompts, backbone, "eval", packing=False, should_stop=should_stop,
                                        flag="--eval.generate_path")}  # fmt: skip
    if config.train.eval_every < 0:
        eval_data = {}  # built for the generation evals only
    # resume: the newest intact checkpoint of this run (auto), a given one, or none; refused if it is another
    # backbone's or stage's
    hf_extras = hf_extras_writer(config, backbone)
    checkpoints = build_checkpoint_manager(config, env, hf_extras, lora)
    replace = config.run.overwrite and (Path(config.run.output_dir) / "final").exists()  # its checkpoints will go
    resume_from = None if replace else checkpoints.select(config.run.resume)
    if resume_from is not None:
        check_resume_within_steps(resume_from, config, items_per_epoch(train_data))
    return Prepared(config, backbone, train_data, eval_data, attn, hf_extras, checkpoints, resume_from, replace, lora,
                    held_out)  # fmt: skip


def check_resume_within_steps(checkpoint: Path, config: Config, items: int) -> None:
    """A checkpoint past the run's last step would train nothing and export its own weights as final/."""
    train = config.train
    total = train.max_steps or train.epochs * (items // train.global_batch_size)
    step = read_checkpoint_meta(checkpoint)["step"]
    if step > total:
        flag = f"--train.max_steps={train.max_steps}" if train.max_steps else f"--train.epochs={train.epochs}"
        raise CheckpointError(f"cannot resume {checkpoint} (step {step}): it is past the last step of this run "
                              f"({total}, {flag}); raise {flag.split('=')[0]}, or start again in a new "
                              "--run.output_dir")  # fmt: skip


def check_fills_a_batch(data: TokenizedData, config: Config) -> None:
    rows, batch = items_per_epoch(data), config.train.global_batch_size
    if rows < batch:
        unit = f"packed rows of {config.data.max_length} tokens" if data.packed else "examples"
        what = "data.sources: an epoch of the mixture's" if config.data.sources else f"--data.path={config.data.path}:"
        raise DataError(f"{what} {rows} {unit} cannot fill one global batch of {batch}; "
                        "lower --train.global_batch_size or add data")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    env = read_env()
    setup_logging(is_rank0())
    watch_launcher()  # a worker that torchrun started stops when torchrun dies, however it dies
    # From here on SIGUSR1/SIGTERM/SIGINT ask for a checkpoint at the next step boundary instead of killing the process.
    preemption = PreemptionHandler()
    preemption.received = preemption.received or (EARLY_SIGNALS[0] if EARLY_SIGNALS else None)
    try:
        prepared = prepare(sys.argv[1:] if argv is None else argv, env, lambda: preemption.received is not None)
    except BAD_INPUT as error:
        message = redact(f"shardtune: {error}")
        tell_the_launcher(message)  # every rank: torchrun's summary shows it as the root cause
        if is_rank0():
            print(message, file=sys.stderr)
        return EXIT_BAD_INPUT
    except TokenizingStopped:
        prepared = None  # the finished parts of the tokenization cache are kept: the re-run builds only the rest
    if preemption.received is not None:  # a signal while preparing: nothing to checkpoint yet
        return stopped_while_preparing(preemption.received, sys.argv[1:] if argv is None else argv)
    config = prepared.config
    # Loading and saving run under the long timeout; training collectives under --run.collective_timeout_s.
    init_distributed(env, timeout_s=config.checkpoint.timeout_s, cpu_collectives=config.fsdp.cpu_offload)
    lock = RunDirLock(config.run.output_dir)
    problem = broadcast_object(lock.acquire() if is_rank0() else None)  # one owner per run directory
    if problem:
        if is_rank0():
            print(redact(f"shardtune: {problem}"), file=sys.stderr)
        teardown()
        return EXIT_BAD_INPUT
    if is_rank0():
        clean_leftovers(config.run.output_dir)
    status = EXIT_OK
    try:
        fit_and_export(prepared, env, preemption)
    except Stopped as stopped:
        status = stopped.status
    except RunFailed as error:
        # Peers may be gone or frozen: say what happened and leave at once (tearing down could wait on them).
        message = redact(f"shardtune: rank {env.rank}: {error}")
        tell_the_launcher(message)
        print(message, file=sys.stderr, flush=True)
        os._exit(EXIT_FAILED)
    except (CheckpointError, ExportError) as error:  # every rank raises it together (a full disk): the group is healthy
        if is_rank0():
            print(redact(f"shardtune: {error}"), file=sys.stderr)
        status = EXIT_FAILED
    finally:
        # Free the sharded model (and with it every reference to the process groups) before destroying them:
        # c10d/gloo objects left for interpreter shutdown to destroy can abort the process after a clean run.
        prepared = None
        gc.collect()
        teardown()
        lock.release()
    return status


def stopped_while_preparing(signum: int, argv: list[str]) -> int:
    """Ctrl-C exits with 130; a preemption with 75 and, on rank 0, the `preempted` marker that makes the batch script
    requeue the job (the re-run resumes a half-built tokenization)."""
    if signum == signal.SIGINT:
        return EXIT_INTERRUPTED
    if is_rank0():
        with contextlib.suppress(ConfigError, OSError):
            run_dir = Path(parse_config(argv).run.output_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            write_marker(run_dir, 0, signum)
        log.warning("preempted before training started; exiting with status %d for a requeue", EXIT_PREEMPTED)
    return EXIT_PREEMPTED


def items_per_epoch(data: TokenizedData) -> int:
    """A mixture's epoch (its sources' shares); otherwise every item once."""
    return data.dataset.items_per_epoch if isinstance(data.dataset, Mixture) else len(data.dataset)


def config_digest(config: Config) -> str:
    """Digest of what defines the training trajectory (model, data, train, fsdp), not where it is written."""
    sections = config_to_dict(config)
    relevant = {k: sections[k] for k in ("model", "data", "train", "fsdp")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def build_checkpoint_manager(config: Config, env: DistEnv, hf_extras: Callable[[Path], None],
                             lora: LoraSettings | None) -> CheckpointManager:  # fmt: skip
    identity = {
        "backbone": config.model.backbone,
        "stage": config.train.stage,
        "lora": lora.describe() if lora else "-",  # a LoRA checkpoint resumes only with the same adapters
        "lora_settings": dataclasses.asdict(lora) if lora else None,  # for the offline export
        "world_size": env.world_size,
        "config_digest": config_digest(config),
        "keep_best_by": config.checkpoint.keep_best_by,
    }
    ckpt = config.checkpoint
    return CheckpointManager(
        Path(config.run.output_dir) / "checkpoints",
        SavePolicy(
            ckpt.every_steps,
            ckpt.every_minutes,
            ckpt.keep_last,
            ckpt.async_save,
            ckpt.timeout_s,
            ckpt.keep_best_by,
            BEST_BY.get(ckpt.keep_best_by) == "lowest",
        ),
        identity,
        env.device,
        must_match={"backbone": "--model.backbone", "stage": "--train.stage", "lora": "--lora.*"},
        hf_extras=hf_extras,
    )


def fit_and_export(prepared: Prepared, env: DistEnv, preemption: PreemptionHandler | None = None) -> Trainer:
    """Shard, load, train and export; returns the trainer (its sharded model stays usable)."""
    config, backbone, checkpoints = prepared.config, prepared.backbone, prepared.checkpoints
    run_dir = Path(config.run.output_dir)
    torch.manual_seed(config.run.seed)
    # stage: freeze per recipe, and decide decay groups and the FLOP count from unsharded names and shapes
    apply_stage(backbone, config.train.stage, prepared.lora)
    decay_names = decay_parameter_names(backbone.llm)
    flops = build_flop_counter(backbone.llm)
    # shard: activation checkpointing -> compile -> FSDP2 per decoder layer, then root (still on meta)
    fsdp, train = config.fsdp, config.train
    model = apply_parallelism(
        backbone.llm,
        backbone.transformer_layer_cls,
        build_mesh(env, fsdp.sharding),
        param_dtype=backbone.half_precision_dtype if fsdp.mixed_precision == "bf16" else None,
        activation_checkpointing=fsdp.activation_checkpointing,
        cpu_offload=fsdp.cpu_offload,
        reshard_after_forward=fsdp.sharding not in ("grad-op", "none"),
        unsharded_grad_accumulation=fsdp.unsharded_grad_accumulation,
        compile=train.compile_backend if train.compile else None,
    )
    # materialise: allocate this rank's shards; recompute buffers no state dict carries (rotary inv_freq)
    materialize(model, env.device)
    backbone.init_non_persistent_buffers()
    layout = batch_layout(config.data.packing, prepared.attn)
    data = prepared.train_data
    # padded micro-batches are sorted by length
    lengths = data.dataset.lengths if layout == "padded" else None
    mixture = data.dataset if isinstance(data.dataset, Mixture) else None
    sampler = GlobalBatchSampler(items_per_epoch(data), train.global_batch_size, config.run.seed, lengths,
                                 mixture.order if mixture else None)  # fmt: skip
    total_steps = train.max_steps or train.epochs * sampler.steps_per_epoch
    # The schedule before the load: building it writes the step-0 learning rate into the optimizer, which the
    # checkpoint's optimizer state must then overwrite, not the other way round.
    optimizer = build_optimizer(model, decay_names, train)
    scheduler = build_schedule(optimizer, train, total_steps)
    # load: the checkpoint rank 0 chose (model, optimizer, trainer state), or rank 0 reads the pretrained weights one
    # tensor at a time and every rank keeps its shards of each broadcast
    state = checkpoints.load(model, optimizer, prepared.resume_from, backbone.pretrained_weights)
    # start: only now may a finished run that --run.overwrite replaces go; then config.yaml and the trackers
    if is_rank0():
        start_run(config.run.output_dir, prepared.replace_finished, dump_config(config))
        write_run_record(run_dir, env)
        if state is None and (kept := set_aside_earlier_records(config.run.output_dir)):
            log.warning("%s: no checkpoint to resume, so this run starts from the pretrained weights at step 0; the "
                        "records of an earlier start there are kept as %s", run_dir, ", ".join(kept))  # fmt: skip
    barrier()
    started = time.monotonic()
    peak = peak_bf16_flops(torch.cuda.get_device_name(env.device)) if env.device.type == "cuda" else None
    metrics = MetricsWriter(run_dir, config.run.trackers, config_to_dict(config), is_rank0(), config.run.wandb_project)
    trainer = Trainer(
        train,
        env,
        model,
        optimizer,
        scheduler,
        sampler,
        total_steps,
        prepared.train_data,
        prepared.eval_data,
        backbone.tokenizer.pad_token_id,
        metrics,
        layout,
        flops,
        peak,
        config.run.heartbeat_s,
        generation_eval(prepared, env),
        config.eval.generate_every,
        StepProfiler(profile_range(config.run.profile_steps), run_dir / "profile", env.rank, env.device),
    )
    if state is not None:
        trainer.load_state_dict(state)
        metrics.truncate_after(trainer.step)
    log.info(
        "training %d steps: global batch %d = %d ranks x micro-batch %d x %d accumulation steps",
        trainer.total_steps,
        train.global_batch_size,
        env.world_size,
        train.micro_batch_size,
        train.global_batch_size // (env.world_size * train.micro_batch_size),
    )
    set_collective_timeout(config.run.collective_timeout_s)
    try:
        trainer.fit(StepEnd(checkpoints, preemption or PreemptionHandler(), run_dir))
        checkpoints.finish()
    except RuntimeError as error:
        if (failure := collective_failure(error)) is None:
            raise
        waited = (f" (no collective finished within --run.collective_timeout_s={config.run.collective_timeout_s:g} s)"
                  if failure.startswith("a collective did not finish") else "")  # fmt: skip
        raise RunFailed(
            f"step {trainer.step + 1}: {failure}{waited}; re-run the same command to resume from the newest "
            f"checkpoint [{str(error).strip().splitlines()[0]}]"
        ) from None
    finally:
        metrics.close()
    # export: final/ from the trained state, which the last step's checkpoint also holds (a failed export only needs
    # the same command again)
    export_final(config, model, run_dir / "final", prepared.hf_extras, prepared.lora, backbone.hf_hub_path)
    peaks = all_gather_object(peak_memory_gib(env.device))
    if is_rank0():
        saved = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir())
        best = (config.checkpoint.keep_best_by, checkpoints.best()) if config.checkpoint.keep_best_by else None
        write_summary(run_dir, time.monotonic() - started, peaks, saved, run_dir / "final",
                      mixture.plan() if mixture else None, best)  # fmt: skip
    log.info("done: %s", run_dir / "final")
    return trainer


def generation_eval(prepared: Prepared, env: DistEnv) -> GenerationEval | None:
    """The generation evals' prompts and decoding (--eval.*), or None when off."""
    config, backbone = prepared.config, prepared.backbone
    if config.eval.generate_every <= 0:
        return None
    tokenizer = backbone.tokenizer
    stop_ids = {tokenizer.eos_token_id}
    if backbone.end_of_turn_token:
        stop_ids.add(tokenizer.convert_tokens_to_ids(backbone.end_of_turn_token))
    prompts = held_out(prepared.held_out, config.eval.generate_count, stop_ids)
    log.info("generation evals every %d steps: %d held-out prompts, greedy, up to %d new tokens",
             config.eval.generate_every, len(prompts), config.eval.max_new_tokens)  # fmt: skip
    return GenerationEval(prompts, tokenizer, stop_ids, config.eval.max_new_tokens, batch_layout(False, prepared.attn),
                          env.device, config.eval.samples)  # fmt: skip


def hf_extras_writer(config: Config, backbone: HFCausalLLMBackbone):
    """Writes everything of a Hugging Face directory but the weights: config (in export.dtype, cache on),
    generation config and tokenizer (with its pad token)."""
    hf_config = copy.deepcopy(backbone.llm.config)
    tokenizer = copy.deepcopy(backbone.tokenizer)
    hf_config.use_cache = True
    hf_config.dtype = "bfloat16" if config.export.dtype == "bf16" else "float32"
    generation_config = copy.deepcopy(backbone.llm.generation_config)
    generation_config.pad_token_id = backbone.tokenizer.pad_token_id

    def save_extras(directory: Path) -> None:
        hf_config.save_pretrained(directory)
        generation_config.save_pretrained(directory)
        save_chat_tokenizer(tokenizer, backbone.prompt_builder_fn, directory)  # the family's format, token-exact
        scrub_directory(directory)  # transformers records local paths (_name_or_path), which may hold a secret

    return save_extras


def export_final(config: Config, model, out_dir: Path, hf_extras: Callable[[Path], None],
                 lora: LoraSettings | None, base_path: str) -> None:  # fmt: skip
    """final/: a Hugging Face directory in `export.dtype` that plain transformers loads (LoRA merged in), and for a
    LoRA run final/adapter/, the peft adapter."""
    export = config.export
    export_model(model_tensor_sources(model), out_dir, export.dtype, export.max_shard_size_mb, is_rank0(), hf_extras,
                 lora, base_path)  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    status = main()
    if status == EXIT_BAD_INPUT:
        # Refused before anything started: leave now. Python's shutdown restores default signal handlers, and under
        # torchrun the SIGTERM it sends the other workers once one exits would then end them with -15, not this 2.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
