"""Signals that stop a run at a step boundary with a checkpoint.

- SIGUSR1 (Slurm's `--signal=USR1@T`, `scancel --signal=USR1`) or SIGTERM: preemption. All ranks agree at the next
  step boundary (one collective), save a checkpoint, leave a `preempted` marker for the batch script to requeue on,
  and exit with EXIT_PREEMPTED.
- SIGINT (Ctrl-C): the same checkpoint, then a clean exit with EXIT_INTERRUPTED and no marker.
A second SIGINT or SIGTERM means "now": the process exits at once, without a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)
MARKER = "preempted"
PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionHandler:
    def __init__(self, signals: tuple[int, ...] = (*PREEMPT_SIGNALS, signal.SIGINT)) -> None:
        self.received: int | None = None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        if self.received is not None and signum in (signal.SIGTERM, signal.SIGINT):
            print(f"shardtune: {signal.Signals(signum).name} again: stopping now, without a checkpoint",
                  file=sys.stderr, flush=True)  # fmt: skip
            os._exit(128 + signum)
        self.received = signum

    def votes(self) -> list[float]:
        """This rank's part of the step-boundary collective: [interrupted, preempted]."""
        return [float(self.received == signal.SIGINT), float(self.received in PREEMPT_SIGNALS)]


def write_marker(run_dir: Path, step: int, signum: int | None) -> None:
    name = signal.Signals(signum).name if signum else "peer"
    (run_dir / MARKER).write_text(json.dumps({"step": step, "signal": name, "time": time.time()}) + "\n")
