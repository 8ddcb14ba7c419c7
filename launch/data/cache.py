"""Stage 5 of the data pipeline: examples (ids, labels) -> a cache entry on disk, and the memory-mapped examples read
back from it.

An entry is a directory named by a digest of everything that decides its content (source content, tokenizer,
prompt format, data settings):
    part-000042/     one per source part: ids.bin (int32), supervised.bin (uint8), offsets.bin (int64, one more than
                     its examples), overlong.bin (uint8); written as .part-000042.tmp/ and renamed when whole
    manifest.json    written last: the entry is complete (its parts, examples, tokens, supervised tokens, overlong)
A part is written batch by batch (`PartWriter`), so its builder holds one batch whatever the dataset's size; a build
that is stopped keeps its finished parts, and the next run builds only the rest (launch/data/workers.py runs the
parts). Training reads the arrays through memory maps: the page cache, not the process, holds the data.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

IGNORE_INDEX = -100
MANIFEST = "manifest.json"
ARRAYS = {"ids": np.int32, "supervised": np.uint8, "offsets": np.int64, "overlong": np.uint8}
COUNTS = ("rows", "examples", "tokens", "supervised", "overlong")  # what every part and entry counts
# One batch of encoded examples: (ids, labels, overlong) each
Encoded = list[tuple[list[int], list[int], bool]]


PART = "part-{:06d}"  # a part's directory: present only when whole


def part_name(index: int) -> str:
    return PART.format(index)


class PartWriter:
    """One part's arrays, appended batch by batch under `.part-NNNNNN.tmp/` and renamed to `part-NNNNNN/` when
    `finish` has written its counts: a part is whole or absent."""

    def __init__(self, entry: Path, index: int, max_length: int) -> None:
        self.final, self.tmp = entry / part_name(index), entry / f".{part_name(index)}.tmp"
        self.max_length = max_length
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.counts = dict.fromkeys(COUNTS, 0)
        self.files = {name: (self.tmp / f"{name}.bin").open("wb") for name in ARRAYS}
        np.zeros(1, np.int64).tofile(self.files["offsets"])
        self.end = 0

    def append(self, encoded: Encoded, rows: int, extra: dict[str, int]) -> None:
        """A batch: its kept examples (cut to max_length), the rows it read, and counts of the encoder's own."""
        self.counts["rows"] += rows
        for key, value in extra.items():
            self.counts[key] = self.counts.get(key, 0) + value
        if not encoded:
            return
        flat_ids, flat_labels, lengths = [], [], []
        for example_ids, example_labels, _ in encoded:
            n = min(len(example_ids), self.max_length)
            flat_ids += example_ids[:n]
            flat_labels += example_labels[:n]
            lengths.append(n)
        ids, labels, lengths = np.array(flat_ids, np.int32), np.array(flat_labels, np.int64), np.array(lengths)
        supervised = labels != IGNORE_INDEX
        ids.tofile(self.files["ids"])
        supervised.astype(np.uint8).tofile(self.files["supervised"])
        (self.end + np.cumsum(lengths)).tofile(self.files["offsets"])
        np.array([long for _, _, long in encoded], np.uint8).tofile(self.files["overlong"])
        self.end += int(lengths.sum())
        self.counts["examples"] += len(encoded)
        self.counts["tokens"] += len(ids)
        self.counts["supervised"] += int(supervised.sum())
        self.counts["overlong"] += sum(long for _, _, long in encoded)

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def finish(self) -> dict:
        self.close()
        (self.tmp / "counts.json").write_text(json.dumps(self.counts) + "\n")
        os.rename(self.tmp, self.final)
        return self.counts


def write_manifest(entry: Path, parts: int) -> dict:
    """The manifest of an entry whose `parts` parts are all built (their names and counts, and the sums), written last
    and atomically: the entry is complete."""
    counts = {i: json.loads((entry / part_name(i) / "counts.json").read_text()) for i in range(parts)}
    manifest = {"parts": [{"name": part_name(i), **counts[i]} for i in sorted(counts)]}
    for key in sorted({key for part in manifest["parts"] for key in part if key != "name"} | set(COUNTS)):
        manifest[key] = sum(part.get(key, 0) for part in manifest["parts"])
    (entry / f".{MANIFEST}.tmp").write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(entry / f".{MANIFEST}.tmp", entry / MANIFEST)
    return manifest


def write_entry(entry: Path, examples: list[tuple[list[int], list[int]]]) -> TokenizedExamples:
    """An entry from examples already tokenized (benchmarks' synthetic data), read back as the pipeline reads it."""
    longest = max((len(ids) for ids, _ in examples), default=1)
    writer = PartWriter(entry, 0, longest)
    writer.append([(ids, labels, False) for ids, labels in examples], len(examples), {})
    writer.finish()
    write_manifest(entry, 1)
    return TokenizedExamples(entry)


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

    def supervised_count(self, index: int) -> int:
        """The example's supervised tokens that a loss counts (its first token is never predicted)."""
        part, a, b = self.locate(int(index))
        return int(np.count_nonzero(part["supervised"][a + 1 : b]))

    @property
    def lengths(self) -> np.ndarray:
        """Every example's token count, in order (int64)."""
        if self._lengths is None:
            self._lengths = np.concatenate([np.diff(p["offsets"]) for p in self.parts] or [np.zeros(0, np.int64)])
        return self._lengths
