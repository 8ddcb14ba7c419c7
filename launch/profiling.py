"""`--run.profile_steps A:B`: a torch.profiler trace of training steps A to B (1-based, inclusive) per rank, as
`<run>/profile/trace-rank<R>.json` (Chrome trace format: Perfetto or chrome://tracing open it), CPU activity and,
on CUDA, kernels. On CUDA it also records the allocator's history over those steps and dumps
`profile/memory-rank<R>.pickle` for https://pytorch.org/memory_viz. Off (None) it does nothing at all.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)
MEMORY_EVENTS = 100_000  # allocator events kept: enough for a few steps of a 7B model


class StepProfiler:
    def __init__(self, steps: tuple[int, int] | None, out_dir: Path | None = None, rank: int = 0,
                 device: torch.device | None = None) -> None:  # fmt: skip
        self.steps, self.out_dir, self.rank = steps, out_dir, rank
        self.cuda = device is not None and device.type == "cuda"
        self.profile = self.span = None

    def before(self, step: int) -> None:
        """Called before training step `step` (1-based): starts the trace at A, and opens a span named
        ProfilerStep#<step> (the name torch.profiler's own schedule gives, which trace viewers group by)."""
        if self.steps is None or not self.steps[0] <= step <= self.steps[1]:
            return  # off, done, or outside the range (a resume inside it starts there)
        if self.profile is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.memory._record_memory_history(max_entries=MEMORY_EVENTS)
            self.profile = torch.profiler.profile(activities=activities, record_shapes=True)
            self.profile.__enter__()
        self.span = torch.profiler.record_function(f"ProfilerStep#{step}")
        self.span.__enter__()

    def after(self, step: int) -> None:
        """Called after training step `step`: closes its span, and ends the trace after the last one."""
        if self.profile is None:
            return
        self.end_span()
        if step >= self.steps[1]:
            self.close()

    def end_span(self) -> None:
        if self.span is not None:
            self.span.__exit__(None, None, None)
            self.span = None

    def close(self) -> None:
        """Write what was recorded (also when training stops inside the range)."""
        if self.profile is None:
            return
        self.end_span()
        profile, steps, self.profile, self.steps = self.profile, self.steps, None, None  # once per run
        profile.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace = self.out_dir / f"trace-rank{self.rank}.json"
        profile.export_chrome_trace(str(trace))
        written = [trace]
        if self.cuda:
            snapshot = self.out_dir / f"memory-rank{self.rank}.pickle"
            torch.cuda.memory._dump_snapshot(str(snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
            written.append(snapshot)
        log.info("profile of steps %d-%d: %s", *steps, ", ".join(str(p) for p in written))
