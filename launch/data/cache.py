"""Stage 5 of the data pipeline: examples (ids, labels) -> a cache entry on disk, and the memory-mapped examples read
back from it.

An entry is a directory named by a digest of everything that decides its content (source content, tokenizer,
prompt format, data settings):
    part-000042/     one per source part: ids.bin (int32), supervised.bin (uint8), offsets.bin (int64, one more than
                     its examples), overlong.bin (uint8); written as .part-000042.tmp/ and renamed when whole
    manifest.json    written last: the entry is complete (its parts, examples, tokens, supervised tokens, overlong)
Parts are built by up to 8 forked worker processes. Each streams its part's rows in batches sized to stay under
`--data.tokenize_memory_mb` and appends every batch's arrays to its files, so a worker holds one batch whatever the
dataset's size. A build that is stopped (preemption, Ctrl-C) keeps its finished parts, and the next run builds only
the rest. One process per node builds an entry (a file lock); the others wait, then map it. Training reads the
arrays through memory maps: the page cache, not the process, holds the data.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from launch.data.sources import Part, Row, Source

log = logging.getLogger("launch.data")
IGNORE_INDEX = -100
MANIFEST = "manifest.json"
ARRAYS = {"ids": np.int32, "supervised": np.uint8, "offsets": np.int64, "overlong": np.uint8}
# Resident bytes a tokenizer batch costs per character of text: the rows as Python objects, the prompts, the Rust
# encodings (ids, offsets, token strings) and the labels (measured: ~25 on the tiny and LLaMA-2 tokenizers).
BYTES_PER_CHAR = 40
MAX_BATCH_ROWS = 1000
COUNTS = ("rows", "examples", "tokens", "supervised", "overlong")  # what every part and entry counts

# (rows of one batch) -> (ids, labels, overlong) per kept example, the characters of text the batch held, and counts
# the encoder keeps of its own (summed per part and entry, e.g. answers)
Encoder = Callable[[list[Row]], tuple[list[tuple[list[int], list[int], bool]], int, dict[str, int]]]


class TokenizingStopped(Exception):
    """The build was asked to stop (a signal); the parts finished so far are kept."""


def rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def batch_chars(memory_mib: int) -> int:
    """Characters of text per tokenizer batch that keep this process under `memory_mib`."""
    return max(2**20, int((memory_mib - rss_mib()) * 2**20 / BYTES_PER_CHAR))


def batches(rows: Iterator[Row], encode: Encoder, budget_chars: int) -> Iterator[tuple[list, int, dict]]:
    """(encoded examples, rows read, the encoder's counts) per batch of `rows`: up to MAX_BATCH_ROWS rows, fewer when
    rows are long (the row count adapts to the largest characters-per-row seen, so that a batch stays within
    `budget_chars`)."""
    size, per_row, batch = 64, 1, []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            examples, chars, counts = encode(batch)
            per_row = max(per_row, chars // len(batch) + 1)
            size = max(1, min(MAX_BATCH_ROWS, budget_chars // per_row))
            yield examples, len(batch), counts
            batch = []
    if batch:
        examples, _, counts = encode(batch)
        yield examples, len(batch), counts


def build_part(part: Part, encode: Encoder, entry: Path, max_length: int, memory_mib: int) -> dict:
    """Tokenize one part into `entry/part-NNNNNN` (atomically); returns its counts."""
    final, tmp = entry / part_name(part.index), entry / f".{part_name(part.index)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    counts = dict.fromkeys(COUNTS, 0)
    files = {name: (tmp / f"{name}.bin").open("wb") for name in ARRAYS}
    np.zeros(1, np.int64).tofile(files["offsets"])
    end = 0
    try:
        for encoded, rows, extra in batches(part.rows(), encode, batch_chars(memory_mib)):
            counts["rows"] += rows
            for key, value in extra.items():
                counts[key] = counts.get(key, 0) + value
            if not encoded:
                continue
            flat_ids, flat_labels, lengths = [], [], []
            for example_ids, example_labels, _ in encoded:
                n = min(len(example_ids), max_length)
                flat_ids += example_ids[:n]
                flat_labels += example_labels[:n]
                lengths.append(n)
            ids, labels, lengths = np.array(flat_ids, np.int32), np.array(flat_labels, np.int64), np.array(lengths)
            supervised = labels != IGNORE_INDEX
            ids.tofile(files["ids"])
            supervised.astype(np.uint8).tofile(files["supervised"])
            (end + np.cumsum(lengths)).tofile(files["offsets"])
            np.array([long for _, _, long in encoded], np.uint8).tofile(files["overlong"])
            end += int(lengths.sum())
            counts["examples"] += len(encoded)
            counts["tokens"] += len(ids)
            counts["supervised"] += int(supervised.sum())
            counts["overlong"] += sum(long for _, _, long in encoded)
    finally:
        for f in files.values():
            f.close()
    (tmp / "counts.json").write_text(json.dumps(counts) + "\n")
    os.rename(tmp, final)
    return counts


def part_name(index: int) -> str:
    return f"part-{index:06d}"


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


_JOB: tuple | None = None  # (source, encode, entry, max_length, memory_mib) for forked workers


def _worker_init() -> None:
    # The parent decides when to stop (it terminates the pool); a worker must die on SIGTERM, not checkpoint.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_build(index: int) -> tuple[int, dict]:
    source, encode, entry, max_length, memory_mib = _JOB
    return index, build_part(source.parts[index], encode, entry, max_length, memory_mib)


def build_entry(source: Source, encode: Encoder, entry: Path, max_length: int, memory_mib: int,
                should_stop: Callable[[], bool] = lambda: False) -> dict:  # fmt: skip
    """Build the parts `entry` lacks, then its manifest; returns the manifest. Raises TokenizingStopped (keeping the
    finished parts) when `should_stop()` turns true."""
    global _JOB
    entry.mkdir(parents=True, exist_ok=True)
    done = {int(p.name.split("-")[1]): p for p in entry.glob("part-*") if p.is_dir()}
    pending = [p.index for p in source.parts if p.index not in done]
    counts = {i: read_counts(entry / part_name(i)) for i in done if i < len(source.parts)}
    progress = BuildProgress(source, sum(source.parts[i].size for i in counts))
    if counts:
        log.info("tokenizing %s: resuming, %d of %d parts already built", source.name, len(counts), len(source.parts))
    workers = min(os.cpu_count() or 1, 8, len(pending))
    if workers <= 1:
        for index in pending:
            if should_stop():
                raise TokenizingStopped
            counts[index] = build_part(source.parts[index], encode, entry, max_length, memory_mib)
            progress.advance(source.parts[index].size, counts[index]["examples"])
    else:
        _JOB = (source, encode, entry, max_length, memory_mib)
        pool = multiprocessing.get_context("fork").Pool(workers, initializer=_worker_init)
        try:
            results = pool.imap_unordered(_worker_build, pending)
            for _ in pending:
                while True:
                    try:
                        index, part_counts = results.next(timeout=0.5)
                        break
                    except multiprocessing.TimeoutError:
                        if should_stop():
                            raise TokenizingStopped from None
                counts[index] = part_counts
                progress.advance(source.parts[index].size, part_counts["examples"])
            pool.close()
        finally:
            pool.terminate()
            pool.join()
            _JOB = None
    progress.close()
    manifest = {"parts": [{"name": part_name(i), **counts[i]} for i in sorted(counts)]}
    for key in sorted({key for part in manifest["parts"] for key in part if key != "name"} | set(COUNTS)):
        manifest[key] = sum(part.get(key, 0) for part in manifest["parts"])
    (entry / f".{MANIFEST}.tmp").write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(entry / f".{MANIFEST}.tmp", entry / MANIFEST)
    return manifest


def read_counts(part: Path) -> dict:
    """A finished part's counts (written beside its arrays when it was built)."""
    return json.loads((part / "counts.json").read_text())


def write_entry(entry: Path, examples: list[tuple[list[int], list[int]]]) -> TokenizedExamples:
    """An entry from examples already tokenized (benchmarks' synthetic data), read back as the pipeline reads it."""
    rows = [(example, None) for example in examples]
    source = Source("in-memory", [Part(0, len(rows), lambda: iter(rows))], "", "rows")
    longest = max((len(ids) for ids, _ in examples), default=1)
    build_entry(source, lambda batch: ([(ids, labels, False) for (ids, labels), _ in batch], 0, {}), entry, longest,
                2048)  # fmt: skip
    return TokenizedExamples(entry)


class BuildProgress:
    """Tokenization progress on the building process: a tqdm bar on a terminal; in a log file (Slurm, CI) one line
    every 10 s, with examples/s and the ETA from the share of the source done."""

    every_s = 10.0

    def __init__(self, source: Source, done: int) -> None:
        self.source, self.done = source, done
        self.examples, self.start, self.last, self.first = 0, time.monotonic(), time.monotonic(), done
        self.bar = None
        if sys.stderr.isatty() and len(source.parts) > 1:
            from tqdm import tqdm

            self.bar = tqdm(total=source.total, initial=done, desc=f"tokenizing {source.name}", unit="B" if
                            source.unit == "bytes" else "row", unit_scale=True, file=sys.stderr)  # fmt: skip

    def advance(self, size: int, examples: int) -> None:
        self.done += size
        self.examples += examples
        if self.bar is not None:
            self.bar.update(size)
            return
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            rate = (self.done - self.first) / max(now - self.start, 1e-9)
            eta = datetime.timedelta(seconds=round((self.source.total - self.done) / max(rate, 1e-9)))
            log.info("tokenizing %s: %d examples, %.0f%% of the %s, %.0f examples/s, ETA %s", self.source.name,
                     self.examples, 100 * self.done / max(self.source.total, 1), self.source.unit,
                     self.examples / (now - self.start), eta)  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elapsed = time.monotonic() - self.start
        if self.examples:
            log.info("tokenized %s: %d examples in %.1f s (%.0f examples/s)", self.source.name, self.examples,
                     elapsed, self.examples / max(elapsed, 1e-9))  # fmt: skip


class TokenizedExamples:
    """A complete entry's examples through memory maps: `examples[i]` is {"input_ids", "labels"} (lists)."""

    def __init__(self, entry: Path) -> None:
        self.manifest = json.loads((entry / MANIFEST).read_text())
        self.parts = []
        for part in self.manifest["parts"]:
            if part["examples"]:
                path = entry / part["name"]
                arrays = {n: np.memmap(path / f"{n}.bin", t, "r") for n, t in ARRAYS.items() if n != "overlong"}
                self.parts.append(arrays)
        self.starts = np.cumsum([0] + [len(p["offsets"]) - 1 for p in self.parts])
        self._lengths = None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, index: int) -> tuple[dict, int, int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        p = int(np.searchsorted(self.starts, index, side="right")) - 1
        offsets = self.parts[p]["offsets"]
        j = index - int(self.starts[p])
        return self.parts[p], int(offsets[j]), int(offsets[j + 1])

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        part, a, b = self.locate(int(index))
        ids = np.asarray(part["ids"][a:b])
        labels = np.where(part["supervised"][a:b].astype(bool), ids, IGNORE_INDEX)
        return {"input_ids": ids.tolist(), "labels": labels.tolist()}

    @property
    def lengths(self) -> np.ndarray:
        """Every example's token count, in order (int64)."""
        if self._lengths is None:
            self._lengths = np.concatenate([np.diff(p["offsets"]) for p in self.parts] or [np.zeros(0, np.int64)])
        return self._lengths
