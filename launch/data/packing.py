"""Stage 6 of the data pipeline: examples -> the items batches are made of, examples or packed rows: best-fit-
decreasing bins of examples, each at most `max_length` tokens (TRL's `bfd`), assembled when read (packing copies
nothing), with position ids restarting per example.
"""

from __future__ import annotations

import bisect
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from launch.data.cache import IGNORE_INDEX, TokenizedExamples

log = logging.getLogger("launch.data")


@dataclass
class TokenizedData:
    """One split, ready for batching: examples, or packed rows over them."""

    dataset: TokenizedExamples | PackedRows  # items: {input_ids, labels} (+ position_ids, lengths when packed)
    packed: bool
    from_cache: bool
    overlong: int  # examples truncated or dropped
    padding_fraction: float = 0.0  # packed rows only

    @property
    def examples(self) -> TokenizedExamples:
        return self.dataset.examples if self.packed else self.dataset


def plan_packing(lengths: Sequence[int], max_length: int, seed: int = 0, window: int = 20_000) -> list[list[int]]:
    """Best-fit-decreasing bins of example indices, each bin at most `max_length` tokens (TRL's `bfd`), within
    windows of a seeded shuffle: long and short examples mix, and order stays random at the scale of a window."""
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    bins: list[list[int]] = []
    for lo in range(0, len(order), window):
        chunk = sorted(order[lo : lo + window], key=lambda i: -lengths[i])
        free: list[tuple[int, int]] = []  # (room left, bin index), sorted: the best fit is the first with enough room
        for index in chunk:
            n = lengths[index]
            at = bisect.bisect_left(free, (n, -1))
            if at == len(free):
                bins.append([index])
                room, b = max_length - n, len(bins) - 1
            else:
                room, b = free.pop(at)
                bins[b].append(index)
                room -= n
            if room > 0:
                bisect.insort(free, (room, b))
    return bins


class PackedRows:
    """Packed rows as a view over the tokenized examples: a row is assembled when it is read. Position ids restart per
    example so that, with no attention mask, transformers keeps attention within each example (the padding tail is a
    segment of its own); `lengths` lets flash kernels drop the tail and take exact boundaries."""

    def __init__(self, examples: TokenizedExamples, bins: list[list[int]], max_length: int, pad_id: int) -> None:
        self.examples, self.bins, self.max_length, self.pad_id = examples, bins, max_length, pad_id
        self._lengths: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        rows = [self.examples[i] for i in self.bins[index]]
        ids = [t for row in rows for t in row["input_ids"]]
        # An example's first token is never predicted from the previous example's last one (as collate_flat does).
        labels = [t if j else IGNORE_INDEX for row in rows for j, t in enumerate(row["labels"])]
        lengths = [len(row["input_ids"]) for row in rows]
        pad = self.max_length - len(ids)
        return {
            "input_ids": ids + [self.pad_id] * pad,
            "labels": labels + [IGNORE_INDEX] * pad,
            "position_ids": [p for n in lengths for p in range(n)] + list(range(pad)),
            "lengths": lengths,
        }

    def supervised_count(self, index: int) -> int:
        return sum(self.examples.supervised_count(i) for i in self.bins[index])

    @property
    def lengths(self) -> np.ndarray:
        """Real tokens per row (computed once)."""
        if self._lengths is None:
            sizes = np.fromiter((len(b) for b in self.bins), np.int64, len(self.bins))
            flat = np.fromiter(itertools.chain.from_iterable(self.bins), np.int64, int(sizes.sum()))
            self._lengths = np.add.reduceat(self.examples.lengths[flat], np.cumsum(sizes) - sizes)
        return self._lengths


def pack(examples: TokenizedExamples, max_length: int, pad_id: int, from_cache: bool, overlong: int,
         seed: int = 0) -> TokenizedData:  # fmt: skip
    """Best-fit-decreasing packing into rows of `max_length` (see plan_packing and PackedRows)."""
    lengths = examples.lengths.tolist()
    bins = plan_packing(lengths, max_length, seed)
    padding = 1.0 - sum(lengths) / max(1, len(bins) * max_length)
    log.info("packed %d examples into %d rows of %d tokens; padding fraction %.4f", len(examples), len(bins),
             max_length, padding)  # fmt: skip
    return TokenizedData(PackedRows(examples, bins, max_length, pad_id), True, from_cache, overlong, padding)
