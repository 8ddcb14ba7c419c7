"""Stage 1 of the data pipeline: a source -> its rows, in parts.

A source is a local file (.jsonl, .json, .parquet), a glob of such files (`shards/*.parquet`), a Hub dataset id or a
dataset directory (through the `datasets` package, imported only then), or `bundled`. It is read in parts that are
tokenized independently, by several processes and again after a preemption: byte ranges of a JSON-lines file, row
groups of parquet files, row ranges of a Hub dataset. A part streams its rows (dicts) with their places; nothing is
held whole, except a `.json` list, which is one JSON document. A place (`file:line`, `file row N`) is formatted only
when an error names it: counting lines per row would make reading quadratic in the file's length.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backbones.hub import hub_unreachable, offline_advice
from launch.config import looks_local

# A JSON-lines file is cut into parts of its size / 64, within these bounds: enough parts for 8 workers, each done in
# seconds to a minute (a preemption loses at most that much). The cut depends on the file only, so that a resumed
# build finds the same parts on any machine.
PART_BYTES = 32 * 2**20
MIN_PART_BYTES = 2**20
PART_ROWS = 50_000  # a part of an in-memory or Hub source
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")  # what launch.config.looks_local takes for a local path


class DataError(ValueError):
    """Bad training data: names the file, the line or row, and what was expected."""


class Place:
    """Where a row is, formatted only when an error message needs it."""

    def __init__(self, describe: Callable[[], str]) -> None:
        self.describe = describe

    def __str__(self) -> str:
        return self.describe()


Row = tuple[dict[str, Any], Place]


@dataclass(frozen=True)
class Part:
    """One independently readable piece of a source; `size` is its bytes (JSON lines) or rows (others)."""

    index: int
    size: int
    rows: Callable[[], Iterator[Row]]


@dataclass
class Source:
    """A readable source: its parts in order, a digest of its content (the cache key), and `total` (bytes or rows)."""

    name: str
    parts: list[Part]
    digest: str
    unit: str  # "bytes" or "rows": what Part.size counts

    @property
    def total(self) -> int:
        return sum(p.size for p in self.parts)


def open_source(path: str, hub_split: str, flag: str = "--data.path") -> Source:
    """The source at `path` (a file, a glob, a dataset directory or a Hub id)."""
    local = Path(path).expanduser()
    if local.is_dir():
        files = sorted(p for suffix in LOCAL_SUFFIXES for p in local.glob(f"*{suffix}"))
        if files and all(p.suffix == ".parquet" for p in files):  # a directory of parquet shards
            return parquet_source(path, files)
        return hub_source(str(local), hub_split)
    if "*" in path:
        files = sorted(Path(p) for p in glob.glob(str(local)))
        if not files:
            raise DataError(f"{path}: no files match ({flag})")
        suffixes = {p.suffix for p in files}
        if suffixes == {".parquet"}:
            return parquet_source(path, files)
        if suffixes <= {".jsonl"}:
            return jsonl_source(path, files)
        raise DataError(f"{path}: the files it matches mix {', '.join(sorted(suffixes))}; give one kind ({flag})")
    if not looks_local(path):
        return hub_source(path, hub_split)
    if not local.is_file():
        raise DataError(f"{path}: no such file ({flag})")
    if local.suffix == ".parquet":
        return parquet_source(path, [local])
    if local.suffix == ".json" and not json_lines_inside(local):
        return json_list_source(path, local)
    return jsonl_source(path, [local])


def file_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path.stat().st_size).encode())
        with path.open("rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


# ---- JSON lines: parts are byte ranges; a part reads the lines that start inside it ----
def jsonl_source(name: str, files: list[Path]) -> Source:
    parts = []
    for path in files:
        size = path.stat().st_size
        step = min(PART_BYTES, max(MIN_PART_BYTES, size // 64))
        for start in range(0, size, step):
            end = min(start + step, size)
            parts.append(Part(len(parts), end - start, lambda p=path, a=start, b=end: jsonl_rows(p, a, b)))
    return Source(name, parts, file_digest(files), "bytes")


def json_lines_inside(path: Path) -> bool:
    """A `.json` file may hold JSON lines (many tools write them so): true when it does not start with a list."""
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
    return not head.startswith(b"[")


def jsonl_rows(path: Path, start: int, end: int) -> Iterator[Row]:
    """The rows of the lines whose first byte lies in [start, end)."""
    with path.open("rb") as f:
        if start:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                f.readline()  # the line that began before `start` belongs to the previous part
        while (at := f.tell()) < end:
            line = f.readline()
            if not line:
                break
            if line.strip():
                yield jsonl_row(path, at, line)


def line_number(path: Path, offset: int) -> int:
    with path.open("rb") as f:
        return f.read(offset).count(b"\n") + 1


def jsonl_row(path: Path, offset: int, line: bytes) -> Row:
    place = Place(lambda: f"{path}:{line_number(path, offset)}")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{place}: not valid UTF-8 (byte 0x{line[error.start]:02x} at column {error.start + 1}); "
                        "save the file as UTF-8") from None  # fmt: skip
    try:
        row = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{place}: malformed JSON line ({error.msg}); expected one JSON object per line") from None
    if not isinstance(row, dict):
        raise DataError(f"{place}: expected a JSON object, found {type(row).__name__}")
    return row, place


# ---- a JSON list: one document, read whole ----
def json_list_source(name: str, path: Path) -> Source:
    try:
        rows = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise DataError(f"{name}: not valid UTF-8 at byte {error.start}; save the file as UTF-8") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{name}:{error.lineno}: malformed JSON ({error.msg}); expected a list of objects") from None
    if not isinstance(rows, list):
        raise DataError(f"{name}: expected a JSON list of objects, found {type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{name} row {i}: expected a JSON object, found {type(row).__name__}")

    def read(a: int, b: int) -> Iterator[Row]:
        for i in range(a, b):
            yield rows[i], Place(lambda i=i: f"{name} row {i}")

    return Source(name, row_parts(len(rows), read), file_digest([path]), "rows")


def row_parts(n: int, read: Callable[[int, int], Iterator[Row]]) -> list[Part]:
    return [Part(i, min(a + PART_ROWS, n) - a, lambda a=a: read(a, min(a + PART_ROWS, n)))
            for i, a in enumerate(range(0, n, PART_ROWS))]  # fmt: skip


# ---- parquet: parts are row groups ----
def parquet_source(name: str, files: list[Path]) -> Source:
    import pyarrow.parquet as pq

    parts = []
    for path in files:
        try:
            metadata = pq.ParquetFile(path).metadata
        except Exception as error:  # pyarrow raises ArrowInvalid (a ValueError) or OSError for a damaged file
            raise DataError(
                f"{path}: not a readable parquet file ({str(error).strip().splitlines()[0]}); "
                "--data.path takes parquet files as pyarrow, pandas or datasets write them"
            ) from None
        first = 0
        for group in range(metadata.num_row_groups):
            rows = metadata.row_group(group).num_rows
            parts.append(Part(len(parts), rows, lambda p=path, g=group, f=first: parquet_rows(p, g, f)))
            first += rows
    return Source(name, parts, file_digest(files), "rows")


def parquet_rows(path: Path, group: int, first: int) -> Iterator[Row]:
    import pyarrow.parquet as pq

    index = first
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1000, row_groups=[group])
        for batch in batches:
            for row in batch.to_pylist():
                yield row, Place(lambda i=index: f"{path} row {i}")
                index += 1
    except OSError as error:  # a damaged data page
        raise DataError(f"{path}: row group {group} is not readable ({str(error).strip().splitlines()[0]})") from None


# ---- a Hub dataset or a dataset directory, through `datasets` ----
def hub_source(source: str, split: str) -> Source:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{source}: a Hub dataset or dataset directory needs the `datasets` package (pip install "
                        "datasets); or give a .jsonl, .json or .parquet file") from None  # fmt: skip
    datasets.disable_progress_bars()  # they would interleave with shardtune's own progress lines
    logging.getLogger("datasets").setLevel(logging.WARNING)
    if not Path(source).is_dir() and hub_unreachable():
        raise DataError(offline_advice(f"the dataset '{source}'"))
    try:
        dataset = datasets.load_dataset(source, split=split)
    except (FileNotFoundError, ValueError, ConnectionError) as error:
        raise DataError(f"{source}: could not load split '{split}' ({error}); check --data.path / --data.split "
                        "(offline, give a local file or dataset directory)") from None  # fmt: skip

    def read(a: int, b: int) -> Iterator[Row]:
        for lo in range(a, b, 1000):
            columns = dataset[lo : min(lo + 1000, b)]
            for j in range(min(1000, b - lo)):
                yield {k: v[j] for k, v in columns.items()}, Place(lambda i=lo + j: f"{source} ({split}) row {i}")

    return Source(source, row_parts(len(dataset), read), f"{source}:{split}:{dataset._fingerprint}", "rows")
