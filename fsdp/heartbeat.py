"""Which rank is the job waiting for? Every rank writes a heartbeat into the process group's store (where it is in
training, and when), from a thread that beats while the process runs; rank 0 watches its own progress, and when it
has waited longer than `interval_s` (a stalled collective, or a step that slow), logs one line naming the step and the
ranks it has not heard from: frozen processes (their thread stops too) and ranks behind the point rank 0 waits at.
The collective timeout still ends the job; this only says early, and by name, who is silent.
"""

from __future__ import annotations

import logging
import threading
import time

import torch.distributed as dist

from fsdp import dist as fsdp_dist

log = logging.getLogger("fsdp.heartbeat")


class Heartbeat:
    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.store = fsdp_dist.process_group_store()
        self.enabled = bool(interval_s) and self.store is not None and dist.get_world_size() > 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.step, self.progress, self.changed = 0, 0, time.monotonic()
        self.stopped = threading.Event()
        self.thread = None
        if self.enabled:
            self.thread = threading.Thread(target=self._run, name="shardtune-heartbeat", daemon=True)
            self.thread.start()

    def at(self, step: int, phase: int) -> None:
        """This rank reached `phase` of training step `step` (1-based): 0 its forward/backward, 1 its step end."""
        self.step, self.progress, self.changed = step, 2 * step + phase, time.monotonic()

    def stop(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join(timeout=5)

    def _run(self) -> None:
        beat_every = max(0.2, self.interval_s / 4)
        reported = 0  # how many intervals of the current wait were reported
        while not self.stopped.wait(beat_every):
            try:
                self.store.set(f"heartbeat/{self.rank}", f"{self.progress} {time.time():.3f}")
                if self.rank != 0:
                    continue
                waited = time.monotonic() - self.changed
                if waited < self.interval_s * (reported + 1):
                    reported = 0 if waited < self.interval_s else reported
                    continue
                reported += 1
                silent = self._silent()
                if silent:
                    log.warning("heartbeat: step %d: rank 0 has waited %.0f s; no word from rank%s %s", self.step,
                                waited, "s" if len(silent) > 1 else "", ", ".join(silent))  # fmt: skip
            except Exception:  # the store is gone (teardown, a dead rank 0 store): nothing left to watch
                return

    def _silent(self) -> list[str]:
        now, out = time.time(), []
        for rank in range(1, dist.get_world_size()):
            if not self.store.check([f"heartbeat/{rank}"]):
                out.append(f"{rank} (never heard from)")
                continue
            progress, beat = (float(x) for x in self.store.get(f"heartbeat/{rank}").decode().split())
            quiet = now - beat
            if quiet >= self.interval_s:
                out.append(f"{rank} (last heard {quiet:.0f} s ago)")
            elif progress < self.progress:
                where = "at its end" if progress % 2 else "in its forward/backward"
                out.append(f"{rank} (still at step {int(progress) // 2}, {where})")
        return out
