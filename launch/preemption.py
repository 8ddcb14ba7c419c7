"""Preemption and time limits: SIGUSR1 (Slurm's `--signal=USR1@T`, `scancel --signal=USR1`) or SIGTERM sets a
flag; at the next step boundary all ranks agree through one collective, save a checkpoint and exit with
EXIT_PREEMPTED, leaving a `preempted` marker in the run directory for the batch script to requeue on."""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path

import torch

from fsdp import all_reduce_sum

log = logging.getLogger(__name__)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later" (torchrun itself reports a failed worker as 1)
MARKER = "preempted"


class PreemptionHandler:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)) -> None:
        self.received: int | None = None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        if self.received is not None and signum == signal.SIGTERM:
            raise SystemExit(128 + signum)  # a second SIGTERM means "now"
        self.received = signum

    def agreed(self, device: torch.device) -> bool:
        """Collective: True on every rank when any rank has received a signal."""
        (count,) = all_reduce_sum([1.0 if self.received is not None else 0.0], device)
        return count > 0


def write_marker(run_dir: Path, step: int, signum: int | None) -> None:
    name = signal.Signals(signum).name if signum else "peer"
    (run_dir / MARKER).write_text(json.dumps({"step": step, "signal": name, "time": time.time()}) + "\n")
    log.warning("preempted (%s): checkpoint at step %d saved; exiting with status %d", name, step, EXIT_PREEMPTED)
