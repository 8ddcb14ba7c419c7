"""`make gpu-check` on a machine without CUDA: a one-line refusal, no traceback; and its throughput harness, run on
CPU with a tiny shape so that it cannot rot between the tasks that have a GPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, launch_env, run_cli


@pytest.mark.slow
def test_gpu_check_refuses_cleanly_without_a_gpu():
    result = subprocess.run(["make", "-s", "gpu-check", f"GPU_PYTHON={sys.executable}"], cwd=ROOT, env=launch_env(),
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[0].startswith("gpu-check: needs a CUDA GPU")
    assert "Traceback" not in result.stdout + result.stderr
    direct = run_cli([], nproc=0, script="tests/bench/gpu_throughput.py", timeout=120)
    assert direct.returncode == 2 and direct.stderr.strip() == "gpu_throughput: needs a CUDA GPU (or --cpu-smoke)"


@pytest.mark.slow
def test_throughput_harness_runs_on_cpu_and_writes_its_table(tmp_path):
    out = tmp_path / "throughput.json"
    result = run_cli(["--cpu-smoke", "--out", str(out)], nproc=0, script="tests/bench/gpu_throughput.py")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["attn"], r["activation_checkpointing"]) for r in rows] == [("sdpa", "none")]
    assert all(r["tokens_per_s"] > 0 and r["tflops"] > 0 and r["device"] == "cpu" for r in rows)
    assert "| variant | tokens/s | TFLOP/s | MFU | peak memory (GiB) | planner's estimate (GiB) |" in result.stdout
    assert all(r["planned_allocated_gib"] > 0 for r in rows)


@pytest.mark.slow
def test_with_flash_attn_installed_no_rank_is_forked_from_a_process_that_probed_cuda(monkeypatch):
    """transformers calls torch.cuda.is_available() at import when flash-attn is installed, which on a GPU initialises
    CUDA. Simulated here (a fake flash-attn distribution, every probe recorded with its PID): forked from the warm
    server, a rank's parent has probed; started as on a CUDA machine (spawn), no ancestor has, only the rank itself."""
    import conftest
    import torch

    reports = {}
    for method in ("forkserver", "spawn"):
        done = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "fork_probe.py"), method], cwd=ROOT,
                              env=launch_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        reports[method] = json.loads(done.stdout.strip().splitlines()[-1])
    forked, spawned = reports["forkserver"], reports["spawn"]
    assert set(forked["probes"]) & set(forked["ancestors"]), forked  # the hazard is real in this simulation
    assert not set(spawned["probes"]) & set(spawned["ancestors"]) and spawned["rank"] in spawned["probes"], spawned
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert conftest.ranks_start_method() == "spawn"
