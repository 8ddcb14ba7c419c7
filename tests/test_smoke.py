"""`make smoke`'s steps, shortened: build, before-eval, 2-process torchrun fine-tune, after-eval, generation."""

from __future__ import annotations

import re

import pytest
from conftest import run_cli

pytestmark = pytest.mark.slow


def test_smoke_run_trains_exports_and_generates(tmp_path):
    args = [
        "--nproc",
        "2",
        "--max-steps",
        "80",
        "--output-dir",
        str(tmp_path / "smoke"),
        "--prompts",
        "16",
        "--generate-every",
        "40",
    ]
    result = run_cli(args, nproc=0, module="launch.smoke", timeout=600)  # launch.smoke starts torchrun itself
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    before, after = map(float, re.search(r"eval loss\s+before ([\d.]+)\s+after ([\d.]+)", result.stdout).groups())
    assert after < 0.5 * before
    before, after = map(float, re.search(r"exact match\s+before ([\d.]+)%\s+after ([\d.]+)%", result.stdout).groups())
    assert after > before  # from the launcher's own generation evals, in the run
    assert "generated from final/:" in result.stdout
