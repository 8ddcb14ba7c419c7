"""gpu-check writes each GPU test's outcome as it finishes: one JSON line per test in $GPU_OUT/tests.jsonl (pytest's
JUnit file is written only at the end, and a command stopped at its time limit would leave nothing)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def pytest_runtest_logreport(report) -> None:
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
