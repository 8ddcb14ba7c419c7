"""The launcher end to end on CPU: real 1- and 2-process gloo runs of the tiny recipe."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import FP32, ROOT, TINY, assert_runs_match, launch_env, load_final, ok, read_metrics, run_cli
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.slow


def inspect_run(args: list[str], nproc: int):
    """The tiny recipe through tests/scripts/train_and_inspect.py, which also records placements and dtypes."""
    return run_cli([*TINY, *args], nproc=nproc, script="train_and_inspect.py")


ACCUMULATE = [*TINY, *FP32, "--train.global_batch_size", "8", "--train.max_steps", "6", "--train.lr", "1e-3"]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """The reference for accumulation: one process, the whole global batch in one micro-batch."""
    out = tmp_path_factory.mktemp("one") / "run"
    ok(run_cli([*ACCUMULATE, "--train.micro_batch_size", "8", "--run.output_dir", str(out)], nproc=1))
    return out


def held_gradients(run_dir) -> list[float]:
    """Per rank: the most gradient storage held between micro-steps, as a fraction of the fp32 model."""
    held = []
    for rank in (0, 1):
        storage = json.loads((run_dir / f"grad_storage-rank{rank}.json").read_text())
        held.append(max(storage["between_micro_steps"]) / storage["model_fp32_bytes"])
    return held


@pytest.mark.parametrize("unsharded", ["false", "true"], ids=["sharded", "unsharded-opt-in"])
def test_two_processes_accumulating_train_like_one_and_keep_gradients_sharded(one_process_run, tmp_path, unsharded):
    out = tmp_path / "two"
    args = [*ACCUMULATE, "--train.micro_batch_size", "2", "--fsdp.unsharded_grad_accumulation", unsharded]
    ok(run_cli([*args, "--run.output_dir", str(out)], nproc=2, script="grad_storage.py"))
    if unsharded == "false":  # each rank holds its half of every gradient (plus FSDP's padding), never the whole model
        assert all(0.45 < held <= 0.55 for held in held_gradients(out)), held_gradients(out)
    else:  # the opt-in mode holds the whole model's unsharded fp32 gradients between micro-steps
        assert all(held >= 1.0 for held in held_gradients(out)), held_gradients(out)
    one, two = read_metrics(one_process_run)[0], read_metrics(out)[0]
    assert [r["step"] for r in one] == list(range(1, 7))
    assert [r["tokens"] for r in one] == [r["tokens"] for r in two]
    assert all(abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 for a, b in zip(one, two))
    assert_runs_match(one_process_run, out, atol=1e-5)
    assert one[0]["loss"] > one[-1]["loss"]


def test_last_layer_stage_leaves_frozen_weights_bit_identical(flag_runs, tiny_dir):
    before = load_file(tiny_dir / "model.safetensors")
    after = load_final(flag_runs / "last-layer")
    last = max(int(k.split(".")[2]) for k in before if k.startswith("model.layers."))
    trained_prefixes = ("model.embed_tokens.", f"model.layers.{last}.", "lm_head.")
    frozen = [k for k in before if not k.startswith(trained_prefixes)]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    for k in before:
        if k.startswith(trained_prefixes):
            rows = before[k].shape[0]
            assert not torch.equal(before[k], after[k][:rows]), f"{k} did not train"


def test_bf16_mixed_precision_trains_and_keeps_fp32_master_weights(tmp_path):
    out = tmp_path / "bf16"
    bf16 = [
        "--fsdp.mixed_precision",
        "bf16",
        "--export.dtype",
        "bf16",
        "--train.max_steps",
        "12",
        "--train.global_batch_size",
        "16",
        "--train.eval_every",
        "0",
    ]
    ok(inspect_run([*bf16, "--run.output_dir", str(out)], 0))  # bf16 matmuls are slow on CPU: one process
    steps, evals = read_metrics(out)
    assert steps[-1]["loss"] < 0.8 * steps[0]["loss"] and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    inspected = json.loads((out / "inspect.json").read_text())
    assert inspected["param_dtypes"] == ["torch.float32"] and inspected["compute_dtype"] == "torch.bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_final(out).values())


def test_final_export_loads_with_plain_transformers_and_matches_trained_logits(flag_runs):
    out = flag_runs / "full"  # 2 processes, fp32, exported in fp32
    inspected = torch.load(out / "inspect_logits.pt")
    model = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert tokenizer.pad_token == "<PAD>" and model.config.pad_token_id == tokenizer.pad_token_id
    assert (out / "final" / "generation_config.json").is_file()
    batch = {k: v for k, v in inspected["batch"].items() if k != "labels"}
    with torch.no_grad():
        logits = model(**batch).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[mask], inspected["logits"][mask], rtol=0, atol=1e-5)


def test_plain_python_without_torchrun_runs_the_tiny_recipe(tmp_path):
    result = ok(run_cli([*TINY, "--train.max_steps", "3", "--run.output_dir", str(tmp_path / "run")], nproc=0))
    steps, _ = read_metrics(tmp_path / "run")
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert set(steps[0]) >= {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "step_time_s"}
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "final" / "config.json").is_file()
    assert "attention: PyTorch SDPA" in result.stderr


# Each flag, and what it must visibly change besides the losses (read from FSDP2's own state by the inspect driver).
VARIANTS = {
    "grad-op": (["--fsdp.sharding", "grad-op"], {"reshard_after_forward": [False], "offload_to_cpu": [False]}),
    "none": (["--fsdp.sharding", "none"], {"reshard_after_forward": [False]}),
    "cpu_offload": (
        ["--fsdp.cpu_offload", "true"],
        {"offload_to_cpu": [True], "param_devices": ["cpu"], "optimizer_state_devices": ["cpu"]},
    ),
    "activation_checkpointing": (["--fsdp.activation_checkpointing", "full"], {"checkpointed_blocks": 4}),
    "selective_checkpointing": (["--fsdp.activation_checkpointing", "selective"], {"checkpointed_blocks": 4}),
}


@pytest.fixture(scope="module")
def flag_runs(tmp_path_factory):
    """Full sharding and every variant, 3 steps each on 2 processes: one launch, one process group."""
    out = tmp_path_factory.mktemp("flags")
    variants = {"full": [], "last-layer": ["--train.stage", "last-layer"],
                **{name: flags for name, (flags, _) in VARIANTS.items()}}  # fmt: skip
    args = [*FP32, "--train.max_steps", "3", "--train.global_batch_size", "8", "--train.micro_batch_size", "2"]
    ok(inspect_run([*args, "--run.output_dir", str(out), "--variants", json.dumps(variants)], 2))
    full = json.loads((out / "full" / "inspect.json").read_text())
    assert full["reshard_after_forward"] == [True] and full["offload_to_cpu"] == [False]
    assert full["checkpointed_blocks"] == 0
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_each_fsdp_flag_takes_effect_and_trains_like_full_sharding_in_fp32(flag_runs, variant):
    _, expected = VARIANTS[variant]
    inspected = json.loads((flag_runs / variant / "inspect.json").read_text())
    assert {key: inspected[key] for key in expected} == expected
    full, other = read_metrics(flag_runs / "full")[0], read_metrics(flag_runs / variant)[0]
    assert [r["loss"] for r in full] == pytest.approx([r["loss"] for r in other], abs=1e-5)
    assert (flag_runs / variant / "final" / "model.safetensors").is_file()  # the export ran after the step


def test_compile_matches_eager_losses_and_stops_compiling_after_warm_up(tmp_path):
    """The graphs dynamo captures around FSDP2's hooks, forward and backward (aot_eager): the part of compiling that
    knows about sharding and batch shapes. inductor's code generation is per device (C++ here, Triton on CUDA) and
    runs on the GPU in gpu-check; on this 2-core machine a cold inductor costs 40-50 s of the suite's 10 minutes."""
    common = [*FP32, "--train.max_steps", "4", "--train.global_batch_size", "8", "--train.micro_batch_size", "4",
              "--data.packing", "true"]  # fmt: skip
    variants = {
        "eager": [],
        "compiled": ["--train.compile", "true", "--train.compile_backend", "aot_eager"],
    }  # one process, one launch
    ok(inspect_run([*common, "--run.output_dir", str(tmp_path), "--variants", json.dumps(variants)], 0))
    eager, compiled = read_metrics(tmp_path / "eager")[0], read_metrics(tmp_path / "compiled")[0]
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], abs=1e-5)
    graphs = json.loads((tmp_path / "compiled" / "inspect.json").read_text())["graphs_per_step"]
    graphs = graphs[len(graphs) // 2 :]  # the counter is per process: the compiled run's steps come second
    assert graphs[0] > 0 and graphs[2:] == [graphs[2]] * (len(graphs) - 2), graphs  # nothing new after step 2
    assert not json.loads((tmp_path / "compiled" / "inspect.json").read_text())["inductor_ran"]  # the backend flag took


def test_accelerate_launch_on_two_cpu_processes_trains_like_torchrun(one_process_run, tmp_path):
    """`accelerate launch --multi_gpu` runs torchrun's agent (on CPU too); its plain launcher is refused elsewhere."""
    out = tmp_path / "accelerate"
    accelerate = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu"]
    args = [*ACCUMULATE, "--train.micro_batch_size", "2", "--run.output_dir", str(out)]
    command = [*accelerate, "--num_processes", "2", "-m", "launch.train", *args]
    result = subprocess.run(command, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    assert_runs_match(one_process_run, out, atol=1e-5)
