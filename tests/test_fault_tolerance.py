"""Preemption by SIGTERM, elastic restarts, two torchrun "nodes" on one machine, and hybrid sharding (CPU, gloo)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    FP32_SMALL,
    REFERENCE,
    REFERENCE_STEPS,
    ROOT,
    assert_runs_match,
    descendants,
    free_port,
    launch_command,
    launch_env,
    load_final,
    metrics_steps,
    ok,
    run_cli,
)

pytestmark = pytest.mark.slow


def test_elastic_restart_after_a_killed_worker_completes_with_identical_weights(reference_run, tmp_path):
    out = tmp_path / "run"
    args = [*REFERENCE, "--run.output_dir", str(out)]
    command = launch_command(
        args, 2, torchrun_args=["--standalone", "--max-restarts", "2", "--monitor-interval", "0.5"]
    )
    log = tmp_path / "torchrun.log"  # a file, not a pipe: nobody reads a pipe while the job runs
    job = subprocess.Popen(command, cwd=ROOT, env=launch_env(), stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline and not (
        (out / "checkpoints" / "latest").exists() and max(metrics_steps(out) or [0]) >= 6
    ):
        time.sleep(0.01)
    workers = [pid for pid in descendants(job.pid) if "launch.train" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert workers, "no worker found to kill"
    os.kill(workers[-1], signal.SIGKILL)
    job.wait(timeout=300)
    output = log.read_text()
    assert job.returncode == 0, output[-4000:]
    assert "resuming from" in output  # the restarted workers continued from the newest checkpoint
    assert metrics_steps(out) == list(range(1, REFERENCE_STEPS + 1))
    expected, got = load_final(reference_run), load_final(out)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def run_nodes(
    args: list[str], nnodes: int, nproc: int, logs: Path, timeout: int = 300
) -> list[subprocess.CompletedProcess]:
    """`nnodes` torchrun agents on this machine meeting in one c10d rendezvous on 127.0.0.1."""
    endpoint = f"127.0.0.1:{free_port()}"
    agents = []
    rendezvous = [
        "--nnodes",
        str(nnodes),
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        endpoint,
        "--rdzv_id",
        "shardtune-test",
    ]
    for node in range(nnodes):
        log = (logs / f"node{node}.log").open("w")  # files, not pipes: both agents run while we wait on one
        agents.append(
            (
                subprocess.Popen(
                    launch_command(args, nproc, torchrun_args=rendezvous),
                    cwd=ROOT,
                    env=launch_env(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
    results = []
    for agent, log in agents:
        agent.wait(timeout=timeout)
        log.close()
        results.append(subprocess.CompletedProcess(agent.args, agent.returncode, "", Path(log.name).read_text()))
    return results


@pytest.fixture(scope="module")
def one_node_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("one-node") / "run"
    ok(run_cli([*FP32_SMALL, "--train.max_steps", "6", "--run.output_dir", str(out)], nproc=2))
    return out


def test_two_torchrun_nodes_with_hybrid_sharding_train_like_one_node_with_full_sharding(one_node_run, tmp_path):
    """Two agents in one c10d rendezvous (multi-node torchrun), 2 processes each, sharded within a node and
    replicated across nodes: the same losses and weights as one node of 2 sharding everything."""
    out = tmp_path / "run"
    results = run_nodes(
        [*FP32_SMALL, "--train.max_steps", "6", "--fsdp.sharding", "hybrid", "--run.output_dir", str(out)],
        2,
        2,
        tmp_path,
    )
    for result in results:
        ok(result)
    assert any("mesh (2, 2)" in r.stderr for r in results)  # replicate across 2 nodes x shard within 2 processes
    assert_runs_match(one_node_run, out, atol=1e-5)
