"""Configuration precedence, validation messages, and refusing bad runs up front (no hang, nothing deleted)."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import ROOT, TINY, run_cli

from fsdp import DistEnv
from launch.config import ConfigError, config_to_dict, dump_config, parse_config
from launch.train import BAD_INPUT, prepare
from launch.validate import validate_config


def cpu_env(world_size: int) -> DistEnv:
    """Rank 0 of `world_size` CPU processes, as `read_env` sees it under torchrun (no process group is needed)."""
    return DistEnv(0, world_size, 0, world_size, torch.device("cpu"), "gloo")


def test_precedence_is_defaults_then_recipe_then_cli(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lr: 0.5\n  max_steps: 7\n")
    config = parse_config(["--config", str(recipe), "--train.lr", "0.25"])
    assert config.train.lr == 0.25  # CLI beats the recipe
    assert config.train.max_steps == 7  # recipe beats the default
    assert config.train.micro_batch_size == 4  # default


def test_validation_reports_every_problem_with_value_choices_and_flag():
    config = parse_config(
        [
            "--train.stage",
            "bogus",
            "--fsdp.sharding",
            "zero9",
            "--train.global_batch_size",
            "6",
            "--train.micro_batch_size",
            "4",
        ]
    )
    with pytest.raises(ConfigError) as error:
        validate_config(config, world_size=2)
    message = str(error.value)
    assert "--train.stage=bogus is not valid; choose one of full, last-layer, lora" in message
    assert "--fsdp.sharding=zero9 is not valid; choose one of full, grad-op, hybrid, none" in message
    assert "--train.global_batch_size=6 is not divisible by world size 2 x --train.micro_batch_size=4" in message


def test_text_values_stay_text_on_the_command_line_and_are_refused_unquoted_in_a_recipe(tmp_path):
    # YAML, which draccus reads each value with, takes 3:5 for the base-60 integer 185 and 1e3 for a float
    config = parse_config(["--run.profile_steps", "3:5", "--run.output_dir=1e3", "--data.eval_path", "null"])
    assert (config.run.profile_steps, config.run.output_dir, config.data.eval_path) == ("3:5", "1e3", None)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("run:\n  profile_steps: 3:5\n")
    with pytest.raises(ConfigError, match=r"run.profile_steps: 185 in .*recipe.yaml is not text; quote it"):
        parse_config(["--config", str(recipe)])
    recipe.write_text('run:\n  profile_steps: "3:5"\n')
    assert parse_config(["--config", str(recipe)]).run.profile_steps == "3:5"


def test_saved_config_parses_back_to_the_same_config(tmp_path):
    config = parse_config(["--train.lr", "0.125", "--run.trackers", "[jsonl,wandb]", "--data.packing", "true"])
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_config(config))
    assert parse_config(["--config", str(saved)]) == config
    assert config_to_dict(config)["train"]["lr"] == 0.125


REFUSALS = {
    "unknown_backbone": (["--model.backbone", "llama9-7b"], "--model.backbone=llama9-7b is unknown; valid ids:"),
    "unknown_stage": (
        ["--train.stage", "bogus"],
        "--train.stage=bogus is not valid; choose one of full, last-layer, lora",
    ),
    "unknown_compile_backend": (
        ["--train.compile", "true", "--train.compile_backend", "tensorrt"],
        "--train.compile_backend=tensorrt is not valid; choose one of inductor, aot_eager, eager",
    ),
    "batch_not_divisible": (
        ["--train.global_batch_size", "6", "--train.micro_batch_size", "2"],
        "--train.global_batch_size=6 is not divisible by world size 2 x --train.micro_batch_size=2",
    ),
    "max_length_too_long": (["--data.max_length", "4096"], "--data.max_length=4096 exceeds llama2-tiny-chat's context"),
    "missing_data_path": (
        ["--data.path", "/nonexistent/train.jsonl"],
        "--data.path=/nonexistent/train.jsonl: no such file",
    ),
    "negative_gc_interval": (
        ["--train.gc_every_steps", "-5"],
        "--train.gc_every_steps=-5 must be >= 0 (0: Python's automatic collection)",
    ),
    "keep_best_by_unknown": (
        ["--checkpoint.keep_best_by", "accuracy"],
        "--checkpoint.keep_best_by=accuracy is not valid; choose one of eval_loss, gen_exact_match, gen_contains",
    ),
    "keep_best_by_generation_without_its_evals": (
        ["--checkpoint.keep_best_by", "gen_exact_match"],
        "--checkpoint.keep_best_by=gen_exact_match needs generation evals: --eval.generate_every N",
    ),
    "keep_best_by_off_the_eval_steps": (
        ["--checkpoint.keep_best_by", "eval_loss", "--train.eval_every", "15", "--checkpoint.every_steps", "20"],
        "make --checkpoint.every_steps=20 a multiple of --train.eval_every=15",
    ),
    "profile_steps_backwards": (["--run.profile_steps", "5:3"], "--run.profile_steps=5:3 is not valid: give A:B"),
    "generation_without_held_out_prompts": (
        ["--eval.generate_every", "10", "--data.path", "org/some-dataset"],
        "--eval.generate_every=10 needs held-out prompts: give --eval.generate_path FILE",
    ),
    "flash_attention_on_cpu": (
        ["--model.attn_implementation", "flash_attention_2"],
        "--model.attn_implementation=flash_attention_2 cannot be used",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_bad_run_is_refused_before_anything_is_written(case, tmp_path):
    args, message = REFUSALS[case]
    out = tmp_path / "run"
    with pytest.raises(BAD_INPUT) as error:
        prepare([*TINY, "--run.output_dir", str(out), *args], cpu_env(2))
    assert message in str(error.value)
    assert not out.exists()


@pytest.mark.slow
def test_a_refused_run_exits_on_every_rank_and_says_so_once(tmp_path):
    out = tmp_path / "run"
    message = "--train.stage=bogus is not valid"
    result = run_cli(
        [*TINY, "--run.output_dir", str(out), "--train.stage", "bogus"], nproc=2, timeout=120, launcher="torchrun"
    )  # what a torchrun user sees
    assert result.returncode == 1  # torchrun's own status for a failed worker
    said = [line for line in result.stderr.splitlines() if line.startswith("shardtune:")]
    assert len(said) == 1 and message in said[0]  # said once, by rank 0
    # every worker leaves with the refusal's status (none is killed by the SIGTERM torchrun sends once one exits),
    # and torchrun's summary names the refusal as each one's cause
    assert re.findall(r"^\s*exitcode\s*: (-?\d+)", result.stderr, re.M) == ["2", "2"], result.stderr[-3000:]
    assert re.findall(r"traceback : (.*)", result.stderr) == [said[0]] * 2
    assert not out.exists()  # refused before anything was written


def test_finished_run_directory_is_refused_and_left_intact(tmp_path):
    out = tmp_path / "run"
    (out / "final").mkdir(parents=True)
    (out / "final" / "model.safetensors").write_bytes(b"weights")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(BAD_INPUT) as error:
        prepare([*TINY, "--run.output_dir", str(out)], cpu_env(2))
    assert "holds a finished run" in str(error.value) and "--run.overwrite" in str(error.value)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_overwrite_replaces_a_finished_run(tmp_path):
    out = tmp_path / "run"
    (out / "final").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    result = run_cli(
        [*TINY, "--train.max_steps", "1", "--run.output_dir", str(out), "--run.overwrite", "true"], nproc=1
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "final" / "config.json").is_file() and (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")))
def test_every_shipped_recipe_parses_and_validates(recipe, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("")
    mixture = "sources:" in (ROOT / "recipes" / recipe).read_text()  # its sources name their own data
    config = parse_config(
        ["--config", str(ROOT / "recipes" / recipe), *([] if mixture else ["--data.path", str(data)])]
    )
    validate_config(config, world_size=1 if recipe.startswith("tiny") else 8)


@pytest.mark.parametrize(
    "backbone", ["llama2-7b-pure", "llama2-7b-chat", "llama2-13b-chat", "vicuna-v15-7b", "vicuna-v15-13b"]
)
def test_llama2_and_vicuna_ids_accept_their_4096_token_context(backbone):
    validate_config(parse_config(["--model.backbone", backbone, "--data.max_length", "4096"]), world_size=1)
    with pytest.raises(ConfigError, match=f"--data.max_length=4097 exceeds {backbone}'s context of 4096 tokens"):
        validate_config(parse_config(["--model.backbone", backbone, "--data.max_length", "4097"]), world_size=1)
