"""Shared test setup: offline Hub, a session cache for the tiny model and data, and helpers that launch real
multi-process runs (torchrun, gloo on CPU)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
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


def pytest_runtest_logreport(report) -> None:
    """gpu-check (GPU_OUT set) writes each test's outcome as it finishes: one JSON line per test in
    $GPU_OUT/tests.jsonl. pytest's JUnit file is written only at the end, and a command stopped at its time limit
    would leave nothing."""
    out = os.environ.get("GPU_OUT")
    if not out or (report.when != "call" and report.outcome == "passed"):
        return
    record = {"test": report.nodeid, "phase": report.when, "outcome": report.outcome,
              "seconds": round(report.duration, 2), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
    if report.failed or report.skipped:
        record["detail"] = str(report.longrepr)[-2000:]
    Path(out).mkdir(parents=True, exist_ok=True)
    with (Path(out) / "tests.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")


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
    args: list[str],
    nproc: int = 1,
    script: str | None = None,
    torchrun_args: list[str] | None = None,
    launcher: str = "spawn",
    module: str = "launch.train",
) -> list[str]:
    """The one way tests start shardtune: `python -m MODULE ARGS` (nproc=0), N ranks started the way torchrun
    starts them (tests/scripts/spawn_ranks.py: the env:// variables, no agent), or torchrun itself
    (`launcher="torchrun"`, or any `torchrun_args`) where the launcher is what a test is about. `script` runs a driver
    instead (a name in tests/scripts/, or a path from the repository root)."""
    target = launch_target(script, module)
    if nproc == 0:
        return [sys.executable, *target, *args]
    if launcher == "spawn" and torchrun_args is None:
        return [sys.executable, str(ROOT / "tests" / "scripts" / "spawn_ranks.py"), str(nproc), *target, *args]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    return [*torchrun, *(torchrun_args or ["--standalone"]), *target, *args]


def launch_target(script: str | None, module: str) -> list[str]:
    if script is None:
        return ["-m", module]
    return [str(ROOT / script if "/" in script else ROOT / "tests" / "scripts" / script)]


def launch_env(env: dict | None = None) -> dict:
    """The environment of a launched process: the repository first on PYTHONPATH, before what the caller had there
    (the GPU image's wheels, gpu-check's site directory)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **(env or {})}


def ranks_start_method() -> str:
    """How test ranks start: forked from a warm forkserver (tests/rank_runner.py) on a machine without CUDA; spawned
    fresh on a CUDA machine. The forkserver imports transformers, and with flash-attn installed transformers calls
    torch.cuda.is_available() at import: that initialises CUDA in the process every rank would be forked from, and a
    forked child cannot use CUDA then. A spawned rank pays its own imports (seconds on a GPU machine's CPUs)."""
    import torch

    return "spawn" if torch.cuda.is_available() else "forkserver"


_contexts: dict = {}


def rank_context(method: str | None = None):
    """The multiprocessing context test ranks start from (see ranks_start_method)."""
    import multiprocessing

    method = method or ranks_start_method()
    if method in _contexts:
        return _contexts[method]
    context = multiprocessing.get_context(method)
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "PYTHONPATH")}
    # What the server imports torch under; its sys.path comes from PYTHONPATH (3.11's forkserver ignores ours).
    path = os.pathsep.join(p for p in (str(ROOT), str(ROOT / "tests"), saved["PYTHONPATH"]) if p)
    os.environ.update(OMP_NUM_THREADS="1", PYTHONPATH=path)
    try:
        if method == "forkserver":
            from multiprocessing import forkserver as server

            context.set_forkserver_preload(["rank_preload", "rank_runner"])
            server.ensure_running()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    _contexts[method] = context
    return context


def run_cli(
    args: list[str],
    nproc: int = 1,
    env: dict | None = None,
    timeout: int = 300,
    torchrun_args: list[str] | None = None,
    script: str | None = None,
    launcher: str = "spawn",
    module: str = "launch.train",
) -> subprocess.CompletedProcess:
    """Run `launch_command(...)` to completion, capturing its output. Plain runs and spawned ranks come from
    `rank_context` (tests/rank_runner.py) and behave as `python -m MODULE ARGS` would; torchrun is torchrun."""
    if nproc and (launcher != "spawn" or torchrun_args is not None):
        return subprocess.run(launch_command(args, nproc, script, torchrun_args, launcher, module), cwd=ROOT,
                              env=launch_env(env), capture_output=True, text=True, timeout=timeout)  # fmt: skip
    return ForkedRun(args, nproc, env, script, module).wait(timeout)


class ForkedRun:
    """`nproc` ranks (0: one plain process) as children of `rank_context` (forked from the warm forkserver, or spawned
    on a CUDA machine), running `python -m MODULE ARGS` (or a script) with torchrun's env:// variables. `log` puts
    stdout and stderr together in one file, as a `Popen` test would; otherwise `wait` returns them as a
    CompletedProcess. `start_method` overrides ranks_start_method()."""

    def __init__(self, args: list[str], nproc: int = 0, env: dict | None = None, script: str | None = None,
                 module: str = "launch.train", log: Path | None = None,
                 start_method: str | None = None) -> None:  # fmt: skip
        import tempfile

        import rank_runner

        context = rank_context(start_method)
        self.target, self.args = launch_target(script, module), args
        self.logs = None if log else Path(tempfile.mkdtemp(prefix="shardtune-ranks-"))
        self.out, self.err = (log, log) if log else (self.logs / "stdout", self.logs / "stderr")
        self.out.touch()
        self.err.touch()
        port = str(free_port())
        self.processes = []
        for rank in range(max(nproc, 1)):
            rank_env = launch_env(env)
            if nproc:
                rank_env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), LOCAL_RANK=str(rank),
                                WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0")  # fmt: skip
            process = context.Process(target=rank_runner.run, args=(self.target, args, rank_env, str(ROOT),
                                                                    str(self.out), str(self.err)))  # fmt: skip
            process.start()
            self.processes.append(process)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def poll(self) -> int | None:
        """None while a rank runs, else the status: the first failure's, or 0."""
        if any(p.exitcode is None for p in self.processes):
            return None
        return next((p.exitcode for p in self.processes if p.exitcode), 0)

    def send_signal(self, sig: int) -> None:
        for p in self.processes:
            if p.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, sig)

    def wait(self, timeout: float = 300) -> subprocess.CompletedProcess:
        """Like torchrun: once a rank fails, the others are stopped 5 s later. TimeoutExpired after `timeout`."""
        deadline, failed_at = time.time() + timeout, None
        while self.poll() is None:
            if failed_at is None and any(p.exitcode not in (None, 0) for p in self.processes):
                failed_at = time.time()
            if (failed_at is not None and time.time() > failed_at + 5) or time.time() > deadline:
                for p in self.processes:
                    if p.exitcode is None:
                        p.kill()
            for p in self.processes:
                p.join(timeout=0.02)
        stdout, stderr = self.out.read_text(errors="replace"), self.err.read_text(errors="replace")
        if self.logs:
            shutil.rmtree(self.logs, ignore_errors=True)
        if time.time() > deadline:
            raise subprocess.TimeoutExpired(self.target, timeout, stdout, stderr)
        return subprocess.CompletedProcess(self.target + self.args, self.poll(), stdout, stderr)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train step records, eval records: eval loss, generation evals or both) of a run's metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "eval_loss" in r or "gen_exact_match" in r]


def load_final(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    final = run_dir / "final"
    return {k: v for f in sorted(final.glob("*.safetensors")) for k, v in load_file(f).items()}


TINY = ["--config", "recipes/tiny-full.yaml", "--train.eval_every", "-1"]  # no evaluation: tests that need one ask
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
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [record["step"] for record in records if "loss" in record]


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


def interrupt_with_sigterm(args: list[str], out: Path, min_step: int, log: Path) -> int:
    """Run `python -m launch.train ARGS` (one process) and SIGTERM it once `min_step` steps are logged; returns its
    exit status (75 when it saved a checkpoint and stopped)."""
    job = ForkedRun(args, log=log)
    deadline = time.time() + 120
    while time.time() < deadline and max(metrics_steps(out) or [0]) < min_step and job.poll() is None:
        time.sleep(0.01)
    job.send_signal(signal.SIGTERM)
    return job.wait(timeout=120).returncode


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
