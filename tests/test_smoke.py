"""`make smoke`'s steps, shortened: build, before-eval, 2-process torchrun fine-tune, after-eval, generation."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


def test_smoke_run_trains_exports_and_generates(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.smoke",
            "--nproc",
            "2",
            "--max-steps",
            "120",
            "--output-dir",
            str(tmp_path / "smoke"),
            "--prompts",
            "16",
        ],
        cwd=ROOT,
        env={**os.environ},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    before, after = map(float, re.search(r"eval loss\s+before ([\d.]+)\s+after ([\d.]+)", result.stdout).groups())
    assert after < 0.5 * before
    assert re.search(r"exact match\s+before [\d.]+%\s+after [\d.]+%", result.stdout)
    assert "generated from final/:" in result.stdout
