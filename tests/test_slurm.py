"""A real single-node Slurm cluster on localhost: the shipped sbatch script is preempted mid-run with
`scancel --signal=USR1`, requeues itself, resumes from its checkpoint and finishes with the uninterrupted run's weights.

Skipped (visibly, with the reason) only where Slurm cannot be installed: not root, or no apt-get.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REFERENCE, REFERENCE_STEPS, ROOT, load_final, metrics_steps, read_metrics

pytestmark = pytest.mark.slow

SLURM = ROOT / "tests" / "slurm"
ARGS = REFERENCE[2:]  # the reference run's flags (its recipe is passed to the sbatch script)


@pytest.fixture(scope="module")
def slurm_cluster():
    if os.geteuid() != 0:
        pytest.skip("Slurm test needs root to install and start munge/slurmctld/slurmd")
    if shutil.which("apt-get") is None:
        pytest.skip("Slurm test needs apt-get (Debian packages munge, slurmctld, slurmd, slurm-client)")
    subprocess.run(["bash", str(SLURM / "down.sh")], capture_output=True, timeout=120)
    up = subprocess.run(["bash", str(SLURM / "up.sh")], capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-3000:]
    yield
    subprocess.run(["bash", str(SLURM / "down.sh")], capture_output=True, timeout=120)


def job_field(job_id: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    match = re.search(rf"\b{field}=(\S+)", out)
    return match.group(1) if match else ""


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def test_preempted_job_is_requeued_resumes_and_matches_an_uninterrupted_run(slurm_cluster, reference_run, tmp_path):
    reference = reference_run  # the same recipe and flags, uninterrupted, 2 processes

    out = tmp_path / "slurm-run"
    env = {
        **os.environ,
        "NPROC": "2",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
    }
    submit = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--cpus-per-task=2",
            f"--output={tmp_path}/slurm-%j.out",
            str(ROOT / "launch" / "slurm" / "single-node.sbatch"),
            "recipes/tiny-full.yaml",
            str(out),
            *ARGS,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    log = tmp_path / f"slurm-{job}.out"
    try:
        started = wait_for(
            lambda: (out / "checkpoints" / "latest").exists() and max(metrics_steps(out) or [0]) >= 6, timeout=180
        )
        assert started, f"job {job} never reached step 6: state {job_field(job, 'JobState')}\n" + (
            log.read_text()[-3000:] if log.exists() else ""
        )
        subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
        finished = wait_for(
            lambda: job_field(job, "JobState") in ("COMPLETED", "FAILED", "TIMEOUT", "NODE_FAIL"),
            timeout=300,
            interval=1.0,
        )
        text = log.read_text() if log.exists() else ""
        assert finished and job_field(job, "JobState") == "COMPLETED", (
            f"state {job_field(job, 'JobState')}\n{text[-4000:]}"
        )
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    assert job_field(job, "Restarts") == "1"
    assert "preempted at" in text and "requeueing job" in text  # the first run saved, marked and requeued
    assert "restart 1" in text and "resuming from" in text  # the requeued run continued from the checkpoint
    assert metrics_steps(out) == list(range(1, REFERENCE_STEPS + 1)), "metrics.jsonl must hold every step exactly once"
    assert [r["loss"] for r in read_metrics(out)[0]] == [r["loss"] for r in read_metrics(reference)[0]]
    expected, got = load_final(reference), load_final(out)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
