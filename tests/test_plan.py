"""The planner: its sharded-state arithmetic equals FSDP2's own DTensor sizes at 8 and 64 ranks, every shipped GPU
recipe fits the hardware its comment names, a recipe that cannot fit is told so with the knob to turn, and a plan
takes seconds offline."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
from conftest import ROOT, launch_env, run_cli

from launch.plan import plan

RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.yaml") if not p.name.startswith("tiny"))
HARDWARE = re.compile(r"^# hardware: (\d+) nodes? x (\d+) ([\w-]+)", re.MULTILINE)


@pytest.mark.slow
def test_planned_sharded_bytes_equal_fsdp2_dtensors_at_8_and_64_ranks():
    result = run_cli([], nproc=0, script="plan_dtensor_check.py", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    cases = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert {(c["world"], c["sharding"], c.get("recipe")) for c in cases} == {
        *((w, s, None) for w in (8, 64) for s in ("full", "grad-op", "hybrid")),
        *((8, "full", r) for r in ("llama3.1-8b-instruct-full", "llama3.2-1b-instruct-full", "qwen3-0.6b-full")),
    }
    for case in cases:
        assert case["planned"] == case["dtensors"], case
    by = {(c["world"], c["sharding"]): c["planned"]["params"] for c in cases if "recipe" not in c}
    assert by[(64, "full")] < by[(8, "full")] == by[(64, "hybrid")]  # hybrid shards within a node of 8


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_gpu_recipe_fits_the_hardware_its_comment_names(recipe):
    match = HARDWARE.search(recipe.read_text())
    assert match, f"{recipe.name} states no '# hardware: N node(s) x G gpu' line"
    nodes, gpus, gpu = match.groups()
    result = plan(["--config", str(recipe), "--nodes", nodes, "--gpus-per-node", gpus, "--gpu", gpu,
                   "--no-dtensor-check"])  # fmt: skip
    assert result["fits"], (recipe.name, result["verdict"], result["memory_per_gpu_gib"])


def test_a_recipe_that_cannot_fit_says_by_how_much_and_which_knob_to_turn():
    result = plan(["--config", "recipes/llama2-13b-chat-full.yaml", "--gpus-per-node", "1", "--nodes", "1",
                   "--fsdp.activation_checkpointing", "none", "--train.micro_batch_size", "16",
                   "--train.global_batch_size", "16", "--no-dtensor-check"])  # fmt: skip
    assert not result["fits"] and result["verdict"].startswith("does not fit by ")
    assert result["first_knob"] == "--fsdp.activation_checkpointing full"


@pytest.mark.slow
def test_a_plan_runs_offline_in_seconds(tmp_path):
    """Offline (HF_HUB_OFFLINE=1, the published shapes from the registry). The wall time is mostly importing torch and
    transformers (~7 s on the 2-core CI machine); the plan itself, DTensor check included, takes about a second."""
    start = time.time()
    command = [sys.executable, "-m", "launch.plan", "--config", "recipes/llama2-7b-chat-full.yaml",
               "--gpus-per-node", "8", "--nodes", "1", "--gpu", "h100-80gb",
               "--json", str(tmp_path / "p.json")]  # fmt: skip
    env = launch_env({"HF_HUB_OFFLINE": "1"})
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.time() - start
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fits" in result.stdout.splitlines()[0]
    assert json.loads((tmp_path / "p.json").read_text())["plan_seconds"] < 10 and elapsed < 20, elapsed


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--gpus-per-node", "0"], "--gpus-per-node=0: a plan needs at least one"),
        (["--nodes", "-1"], "--nodes=-1: a plan needs at least one"),
        (["--mfu", "1.5"], "--mfu=1.5 must be in (0, 1]"),
    ],
)
def test_an_impossible_machine_count_is_one_line_not_a_traceback(flags, message, capsys):
    from launch.plan import main

    assert main(["--config", "recipes/llama2-7b-chat-full.yaml", *flags, "--no-dtensor-check"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"shardtune plan: {message}"), lines
