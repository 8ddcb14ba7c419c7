"""gpu-check's parts that run without a GPU: a one-line refusal without CUDA, results into $OUT, the throughput
harness on CPU with tiny shapes (rows as they finish, timeouts and the budget recorded), the wheel list as the import
closure beyond the image, the preflight's one-line refusals, and no rank forked from a process that probed CUDA."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
from conftest import ROOT, launch_env, run_cli

sys.path.insert(0, str(ROOT / "tests" / "bench"))


@pytest.mark.slow
@pytest.mark.parametrize("target", ["gpu-check-tests", "gpu-check-bench"])
def test_gpu_check_commands_refuse_cleanly_without_a_gpu(target):
    result = subprocess.run(["make", "-s", target, f"GPU_PYTHON={sys.executable}"], cwd=ROOT, env=fresh_make_env(),
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and "Traceback" not in result.stdout + result.stderr
    assert lines[0] == "gpu-check: needs a CUDA GPU, and this machine has none (torch.cuda.is_available() is False)"
    assert [re.sub(r"^make(\[\d+\])?: \*\*\* .*", "make's trailer", line) for line in lines[1:]] == ["make's trailer"]
    direct = run_cli([], nproc=0, script="tests/bench/gpu_throughput.py", timeout=120)
    assert direct.returncode == 2 and direct.stderr.strip() == "gpu_throughput: needs a CUDA GPU (or --cpu-smoke)"


def fresh_make_env() -> dict:
    """The environment of a make started by a user: not the variables of a make this suite may be running under
    (make gpu-rehearsal passes its GPU_* overrides down through MAKEFLAGS)."""
    return {k: v for k, v in launch_env().items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")
            and not k.startswith("GPU_")}  # fmt: skip


def test_gpu_check_writes_into_the_device_tools_out_folder_when_it_is_set():
    """Only $OUT comes back from a device machine: results go there when it is set, else into gpu-check/."""

    def dry_run(*variables: str) -> str:
        return subprocess.run(["make", "-n", "gpu-check-bench", *variables], cwd=ROOT, capture_output=True,
                              text=True, timeout=60, env=fresh_make_env()).stdout  # fmt: skip

    assert "--out /tmp/device-out/throughput.jsonl" in dry_run("OUT=/tmp/device-out")
    assert f"--out {ROOT}/gpu-check/throughput.jsonl" in dry_run().replace("--out gpu-check", f"--out {ROOT}/gpu-check")


@pytest.mark.slow
def test_throughput_harness_runs_on_cpu_and_appends_a_row_per_variant(tmp_path):
    out = tmp_path / "throughput.jsonl"
    result = run_cli(["--cpu-smoke", "--out", str(out)], nproc=0, script="tests/bench/gpu_throughput.py")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["shape"], r["attn"], r["activation_checkpointing"]) for r in rows] == [
        ("tiny", "sdpa", "none"), ("tiny-llama3", "sdpa", "none")]  # fmt: skip
    assert all(r["tokens_per_s"] > 0 and r["tflops"] > 0 and r["device"] == "cpu" for r in rows)
    assert "| variant | tokens/s | TFLOP/s | MFU | peak memory (GiB) | planner's estimate (GiB) |" in result.stdout
    assert all(r["planned_allocated_gib"] > 0 for r in rows)


def test_a_variant_past_its_timeout_is_killed_and_recorded_and_the_budget_skips_the_rest(tmp_path, monkeypatch):
    import gpu_throughput

    started = time.monotonic()
    row = gpu_throughput.run_child("tiny", {"attn": "sdpa", "mixed_precision": "fp32"}, cpu=True, timeout=1)
    assert row == {"error": "timed out after 1 s (killed)"} and time.monotonic() - started < 10
    out = tmp_path / "rows.jsonl"
    monkeypatch.setattr(sys, "argv", ["gpu_throughput.py", "--cpu-smoke", "--budget-s", "0", "--out", str(out)])
    assert gpu_throughput.main() == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(r["error"].startswith("skipped: ") for r in rows)


def test_gpu_wheels_are_the_import_closure_beyond_the_image():
    """`make gpu-wheels` downloads what gpu-check imports that the GPU image lacks: draccus and pytest with what they
    require, and nothing the image provides or that only an optional import of an image package reaches."""
    listed = subprocess.run([sys.executable, "tests/gpu/preflight.py", "wheels"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, check=True).stdout.split()  # fmt: skip
    names = {line.split("==")[0].lower().replace("_", "-") for line in listed}
    assert {"draccus", "mergedeep", "toml", "typing-inspect", "mypy-extensions", "pytest", "pluggy"} <= names
    image = {line.split("==")[0] for line in (ROOT / "tests/gpu/image.txt").read_text().splitlines()
             if line and not line.startswith("#")} - {"pytest"}  # fmt: skip
    assert not names & ({n.lower().replace("_", "-") for n in image} | {"datasets", "pandas", "xxhash", "dill"})


def test_preflight_names_a_missing_or_too_old_package_in_one_line(monkeypatch, capsys):
    code = (
        "import sys, runpy; sys.modules['draccus'] = None; sys.argv = ['preflight.py', 'check']; "
        "runpy.run_path('tests/gpu/preflight.py', run_name='__main__')"
    )
    missing = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines() == [missing.stderr.strip()]
    assert missing.stderr.startswith("gpu-check: cannot import draccus") and "make gpu-wheels" in missing.stderr
    sys.path.insert(0, str(ROOT / "tests" / "gpu"))
    import preflight

    monkeypatch.setattr(preflight, "floors", lambda: {"torch": "99.0"})
    assert preflight.check() == 2
    refusal = capsys.readouterr().err.strip()
    assert refusal.startswith("gpu-check: torch ") and "is older than the 99.0 pyproject.toml needs" in refusal


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
