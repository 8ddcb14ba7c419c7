"""Shared test setup: offline Hub, a session cache for the tiny model and data, and helpers that launch real
multi-process runs (torchrun, gloo on CPU)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("SHARDTUNE_HOME", str(ROOT / ".cache" / "test-home"))
os.environ.pop("HF_TOKEN", None)


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    from backbones.tiny import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="session")
def process_group():
    """A one-process gloo group in this pytest process: the fast tier tests collectives' code paths in-process."""
    from fsdp import init_distributed, read_env, teardown

    env = read_env()
    init_distributed(env)
    yield env
    teardown()


@pytest.fixture(scope="session")
def tiny_backbone(tiny_dir):
    from backbones import build_backbone

    return build_backbone("llama2-tiny-chat")


def launch_command(
    args: list[str], nproc: int = 1, script: str | None = None, torchrun_args: list[str] | None = None
) -> list[str]:
    """The one way tests start shardtune: `python -m launch.train ARGS` (nproc=0) or `torchrun --nproc_per_node N`;
    `script` runs a driver from tests/scripts/ instead of launch.train."""
    target = [str(ROOT / "tests" / "scripts" / script)] if script else ["-m", "launch.train"]
    if nproc == 0:
        return [sys.executable, *target, *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        *(torchrun_args or ["--standalone"]),
        *target,
        *args,
    ]


def launch_env(env: dict | None = None) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}


def run_cli(
    args: list[str],
    nproc: int = 1,
    env: dict | None = None,
    timeout: int = 300,
    torchrun_args: list[str] | None = None,
    script: str | None = None,
) -> subprocess.CompletedProcess:
    """Run `launch_command(...)` to completion, capturing its output."""
    return subprocess.run(
        launch_command(args, nproc, script, torchrun_args),
        cwd=ROOT,
        env=launch_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train step records, eval records) of a run's metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "eval_loss" in r]


def load_final(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    final = run_dir / "final"
    return {k: v for f in sorted(final.glob("*.safetensors")) for k, v in load_file(f).items()}


TINY = ["--config", "recipes/tiny-full.yaml", "--train.eval_every", "0"]
# fp32 end to end: the exactness tests compare runs in it.
FP32 = ["--fsdp.mixed_precision", "fp32", "--export.dtype", "fp32"]
# ... with a small global batch.
FP32_SMALL = [*TINY, *FP32, "--train.global_batch_size", "8", "--train.micro_batch_size", "2", "--train.lr", "1e-3"]


def ok(result):
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def metrics_steps(run_dir) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line]


# The uninterrupted reference run that resume tests compare against: 24 steps, checkpoints every 4 (newest 2 kept).
REFERENCE_STEPS = 24
REFERENCE = [*FP32_SMALL, "--train.max_steps", str(REFERENCE_STEPS), "--checkpoint.every_steps", "4"]


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    ok(run_cli([*REFERENCE, "--run.output_dir", str(out)], nproc=2))
    return out


def descendants(pid: int) -> list[int]:
    """All live descendants of `pid` (torchrun starts its workers in sessions of their own, so killpg misses them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def kill_tree(pid: int, sig: int) -> None:
    """Send `sig` to `pid` and all its descendants at once (SIGKILL: nothing gets to clean up)."""
    for target in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, sig)


def interrupt_with_sigterm(args: list[str], out: Path, min_step: int, log: Path) -> int:
    """Run `python -m launch.train ARGS` (one process) and SIGTERM it once `min_step` steps are logged; returns its
    exit status (75 when it saved a checkpoint and stopped)."""
    job = subprocess.Popen(
        launch_command(args, nproc=0), cwd=ROOT, env=launch_env(), stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    deadline = time.time() + 120
    while time.time() < deadline and max(metrics_steps(out) or [0]) < min_step and job.poll() is None:
        time.sleep(0.01)
    job.send_signal(signal.SIGTERM)
    return job.wait(timeout=120)


def assert_runs_match(reference: Path, other: Path, atol: float) -> None:
    """Two runs of the same recipe: the same per-step losses and the same final weights, within `atol`."""
    import torch

    expected_steps, got_steps = read_metrics(reference)[0], read_metrics(other)[0]
    assert [r["step"] for r in got_steps] == [r["step"] for r in expected_steps]
    for a, b in zip(expected_steps, got_steps):
        assert abs(a["loss"] - b["loss"]) <= atol, (a["step"], a["loss"], b["loss"])
    expected, got = load_final(reference), load_final(other)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=atol, msg=name)
