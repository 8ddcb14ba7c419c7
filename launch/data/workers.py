"""The processes that run the pipeline's stages 1-5 over a source's parts; no stage of its own, and no data code.

- `file_lock`: one process per node builds a cache entry, the others wait for it (released if the holder dies);
- `run_parts`: a part function over the parts still to build, inline or in up to 8 forked workers, stopping between
  parts when asked (a signal), with a progress line;
- the memory budget of a tokenizing process, in characters of text per batch.
"""

from __future__ import annotations

import datetime
import fcntl
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("launch.data")
# Resident bytes a tokenizer batch costs per character of text: the rows as Python objects, the prompts, the Rust
# encodings (ids, offsets, token strings) and the labels (measured: ~25 on the tiny and LLaMA-2 tokenizers).
BYTES_PER_CHAR = 40
MAX_WORKERS = 8


class TokenizingStopped(Exception):
    """The build was asked to stop (a signal); the parts finished so far are kept."""


def rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def batch_chars(memory_mib: int) -> int:
    """Characters of text per tokenizer batch that keep this process under `memory_mib`."""
    return max(2**20, int((memory_mib - rss_mib()) * 2**20 / BYTES_PER_CHAR))


@contextmanager
def file_lock(path: Path):
    """An exclusive flock: one process builds a cache entry while the others wait (released if the holder dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_JOB: Callable[[int], dict] | None = None  # the part function, for forked workers


def _worker_init() -> None:
    # The parent decides when to stop (it terminates the pool); a worker must die on SIGTERM, not checkpoint.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_run(index: int) -> tuple[int, dict]:
    return index, _JOB(index)


def run_parts(build: Callable[[int], dict], pending: list[int], progress: BuildProgress,
              should_stop: Callable[[], bool] = lambda: False) -> dict[int, dict]:  # fmt: skip
    """`build(index)` -> the part's counts, for every index in `pending`: inline for one part (or one CPU), else in
    forked workers. Raises TokenizingStopped between parts once `should_stop()` turns true (finished parts stay)."""
    global _JOB
    counts: dict[int, dict] = {}
    workers = min(os.cpu_count() or 1, MAX_WORKERS, len(pending))
    if workers <= 1:
        for index in pending:
            if should_stop():
                raise TokenizingStopped
            counts[index] = build(index)
            progress.advance(index, counts[index]["rows"])
        return counts
    _JOB = build
    pool = multiprocessing.get_context("fork").Pool(workers, initializer=_worker_init)
    try:
        results = pool.imap_unordered(_worker_run, pending)
        for _ in pending:
            while True:
                try:
                    index, part_counts = results.next(timeout=0.5)
                    break
                except multiprocessing.TimeoutError:
                    if should_stop():
                        raise TokenizingStopped from None
            counts[index] = part_counts
            progress.advance(index, part_counts["rows"])
        pool.close()
    finally:
        pool.terminate()
        pool.join()
        _JOB = None
    return counts


class BuildProgress:
    """Tokenization progress on the building process: a tqdm bar on a terminal; in a log file (Slurm, CI) one line
    every 10 s, with rows/s and the ETA from the share of the source done. `sizes` are the parts' sizes in `unit`
    (bytes or rows)."""

    every_s = 10.0

    def __init__(self, name: str, sizes: list[int], unit: str, done: set[int]) -> None:
        self.name, self.sizes, self.unit = name, sizes, unit
        self.total, self.done = sum(sizes), sum(sizes[i] for i in done)
        self.rows, self.start, self.last, self.first = 0, time.monotonic(), time.monotonic(), self.done
        self.bar = None
        if sys.stderr.isatty() and len(sizes) > 1:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.done, desc=f"tokenizing {name}", unit="B" if
                            unit == "bytes" else "row", unit_scale=True, file=sys.stderr)  # fmt: skip

    def advance(self, index: int, rows: int) -> None:
        self.done += self.sizes[index]
        self.rows += rows
        if self.bar is not None:
            self.bar.update(self.sizes[index])
            return
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            rate = (self.done - self.first) / max(now - self.start, 1e-9)
            eta = datetime.timedelta(seconds=round((self.total - self.done) / max(rate, 1e-9)))
            log.info("tokenizing %s: %d rows, %.0f%% of the %s, %.0f rows/s, ETA %s", self.name, self.rows,
                     100 * self.done / max(self.total, 1), self.unit, self.rows / (now - self.start), eta)  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elapsed = time.monotonic() - self.start
        if self.rows:
            log.info("tokenized %s: %d rows in %.1f s (%.0f rows/s)", self.name, self.rows, elapsed,
                     self.rows / max(elapsed, 1e-9))  # fmt: skip
