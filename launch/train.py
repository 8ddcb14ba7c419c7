"""shardtune's entry point: fine-tune a LLaMA-2-family model with FSDP2.

    python -m launch.train --config recipes/tiny-full.yaml                       # one process (CPU or one GPU)
    torchrun --nproc_per_node 2 -m launch.train --config recipes/tiny-full.yaml  # 2 processes (gloo on CPU)
    torchrun --nproc_per_node 8 -m launch.train --config recipes/llama2-7b-chat-full.yaml --train.lr 1e-5
    srun torchrun --nnodes $N --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HEAD:29500 -m launch.train ...

Precedence: dataclass defaults < recipe YAML < CLI flags. Reads top to bottom like the recipe:
parse -> build backbone -> build data -> pick checkpoint -> init distributed -> shard + load -> fit -> export.
"""

from __future__ import annotations

import copy
import gc
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from backbones import HFCausalLLMBackbone, build_backbone
from fsdp import DistEnv, apply_parallelism, barrier, build_mesh, init_distributed, read_env, teardown
from fsdp.checkpoint import Checkpointer
from fsdp.export import export_hf, model_tensor_sources
from fsdp.materialize import load_from_rank0, materialize
from launch.attention import AttentionError, resolve_attn_implementation
from launch.config import Config, ConfigError, dump_config, parse_config, validate_config
from launch.data import TokenizedData, batch_layout, build_tokenized
from launch.data_sources import DataError
from launch.flops import build_flop_counter
from launch.metrics import MetricsWriter, setup_logging
from launch.optim import decay_parameter_names
from launch.preemption import EXIT_PREEMPTED, PreemptionHandler
from launch.resume import ResumeError, checkpoint_identity, select_checkpoint
from launch.rundir import RunDirError, check_run_dir, prepare_run_dir
from launch.stage import apply_stage
from launch.step_end import StepEnd
from launch.trainer import Trainer

log = logging.getLogger("launch.train")
EXIT_BAD_INPUT = 2


@dataclass
class Prepared:
    """Everything built before the process group starts."""

    config: Config
    backbone: HFCausalLLMBackbone
    train_data: TokenizedData
    eval_data: TokenizedData | None
    attn: str
    resume_from: Path | None


BAD_INPUT = (ConfigError, RunDirError, AttentionError, DataError, ResumeError, OSError)


def prepare(argv: list[str], env: DistEnv) -> Prepared:
    """Everything that can be refused, checked identically on every rank before any process group exists: a bad
    run exits at once on all ranks instead of leaving some waiting in a collective."""
    config = parse_config(argv)
    validate_config(config, env.world_size)
    check_run_dir(config.run.output_dir, config.run.overwrite)
    attn, attn_line = resolve_attn_implementation(config.model.attn_implementation, env.device,
                                                  config.fsdp.mixed_precision)
    log.info(attn_line)
    # build: the backbone on `meta` (tokenizer, config, module tree; no weights yet)
    backbone = build_model(config, attn, load_weights=False)
    # data: tokenized through the backbone's prompt builder (cached; every rank reads the same files)
    train_data = build_tokenized(config.data, backbone, "train")
    eval_data = build_tokenized(config.data, backbone, "eval", packing=False) if has_eval(config) else None
    # resume: the newest complete checkpoint of this run (auto), a given one, or none; refused if it is another
    # backbone's or stage's
    return Prepared(config, backbone, train_data, eval_data, attn, select_checkpoint(config))


def main(argv: list[str] | None = None) -> int:
    env = read_env()
    setup_logging(env.is_rank0)
    # From here on SIGUSR1/SIGTERM ask for a checkpoint at the next step boundary instead of killing the process.
    preemption = PreemptionHandler()
    try:
        prepared = prepare(sys.argv[1:] if argv is None else argv, env)
    except BAD_INPUT as error:
        if env.is_rank0:
            print(f"shardtune: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    init_distributed(env, cpu_collectives=prepared.config.fsdp.cpu_offload)
    status = 0
    try:
        fit_and_export(prepared, env, preemption)
    except Preempted:
        status = EXIT_PREEMPTED
    finally:
        # Free the sharded model (and with it every reference to the process groups) before destroying them:
        # c10d/gloo objects left for interpreter shutdown to destroy can abort the process after a clean run.
        prepared = None
        gc.collect()
        teardown()
    return status


def build_model(config: Config, attn: str, load_weights: bool):
    model = config.model
    return build_backbone(model.backbone, path=model.path, hf_token_file=model.hf_token_file,
                          attn_implementation=attn, load_weights=load_weights)


def has_eval(config: Config) -> bool:
    return config.data.eval_path is not None or config.data.path == "bundled"


def fit_and_export(prepared: Prepared, env: DistEnv, preemption: PreemptionHandler | None = None) -> Trainer:
    """Shard, load, train and export; returns the trainer (its sharded model stays usable)."""
    config, backbone = prepared.config, prepared.backbone
    run_dir = Path(config.run.output_dir)
    if env.is_rank0:
        prepare_run_dir(config.run.output_dir, config.run.overwrite, dump_config(config))
    barrier()
    torch.manual_seed(config.run.seed)
    # stage: freeze per recipe, and decide decay groups from unsharded names and shapes
    apply_stage(backbone, config.train.stage)
    decay_names = decay_parameter_names(backbone.llm)
    flops = build_flop_counter(backbone.llm)
    # shard: activation checkpointing -> FSDP2 per decoder layer, then root (still on meta)
    mesh = build_mesh(env, config.fsdp.sharding)
    model = apply_parallelism(backbone.llm, backbone.transformer_layer_cls, config.fsdp, mesh,
                              backbone.half_precision_dtype)
    # materialise: allocate this rank's shards; recompute buffers no state dict carries (rotary inv_freq)
    materialize(model, env.device)
    backbone.init_non_persistent_buffers()
    metrics = MetricsWriter(run_dir, config.run.trackers, config_dict(config), env.is_rank0, config.run.wandb_project)
    trainer = Trainer(config, env, model, decay_names, prepared.train_data, prepared.eval_data,
                      backbone.tokenizer.pad_token_id, metrics, batch_layout(config.data.packing, prepared.attn), flops)
    checkpointer = Checkpointer(run_dir / "checkpoints", config.checkpoint.keep_last, config.checkpoint.async_save,
                                env.device)
    if prepared.resume_from is not None:
        # load: model, optimizer and trainer state from the checkpoint (DCP reshards to this world size)
        trainer.load_state_dict(checkpointer.load(prepared.resume_from, model, trainer.optimizer))
        metrics.truncate_after(trainer.step)
    else:
        # load: rank 0 reads the pretrained weights, every rank receives its shards by broadcast
        full = build_model(config, prepared.attn, load_weights=True).llm if env.is_rank0 else None
        load_from_rank0(model, full)
        del full
    step_end = StepEnd(config.checkpoint, checkpointer, preemption or PreemptionHandler(), env, run_dir,
                       checkpoint_identity(config, env.world_size), hf_extras_writer(config, backbone))
    log.info("training %d steps: global batch %d = %d ranks x micro-batch %d x %d accumulation steps",
             trainer.total_steps, config.train.global_batch_size, env.world_size, config.train.micro_batch_size,
             config.train.global_batch_size // (env.world_size * config.train.micro_batch_size))
    try:
        trainer.fit(step_end)
        checkpointer.finish()
    finally:
        metrics.close()
    if trainer.step < trainer.total_steps:
        raise Preempted(trainer.step)
    export_final(config, backbone, model, run_dir / "final", env.is_rank0)
    log.info("done: %s", run_dir / "final")
    return trainer


class Preempted(Exception):
    """Training stopped at a step boundary after a checkpoint, on a signal."""


def config_dict(config: Config) -> dict:
    return yaml.safe_load(dump_config(config))


def hf_extras_writer(config: Config, backbone: HFCausalLLMBackbone):
    """Writes everything of a Hugging Face directory but the weights: config (in export.dtype, cache on),
    generation config and tokenizer (with its pad token)."""
    hf_config = copy.deepcopy(backbone.llm.config)
    hf_config.use_cache = True
    hf_config.dtype = "bfloat16" if config.export.dtype == "bf16" else "float32"
    generation_config = copy.deepcopy(backbone.llm.generation_config)
    generation_config.pad_token_id = backbone.tokenizer.pad_token_id

    def save_extras(directory: Path) -> None:
        hf_config.save_pretrained(directory)
        generation_config.save_pretrained(directory)
        backbone.tokenizer.save_pretrained(directory)

    return save_extras


def export_final(config: Config, backbone, model, out_dir: Path, is_rank0: bool) -> None:
    """final/: a Hugging Face directory in `export.dtype` that plain transformers loads."""
    export_hf(model_tensor_sources(model), out_dir, config.export.dtype, config.export.max_shard_size_mb,
              write=is_rank0, save_extras=hf_extras_writer(config, backbone))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
