"""Stage 7 of the data pipeline, mixtures: the items (examples or packed rows) of several sources -> one dataset and
the order of each of its epochs.

A source has a weight (a share of the mixture's tokens) or an epoch count (passes over it per epoch of the mixture).
An epoch of the mixture holds as many tokens as its weighted sources hold together, shared out by weight, plus each
epoch-counted source's passes. Source i gives every epoch the same number of items, `count_i`: its passes times its
size, or its token target over its mean item length. They come from an endless stream of its items, a fresh seeded
permutation per pass, continuing where the previous epoch stopped: a source weighted past its size repeats in a new
order, one weighted below it is seen in part and the rest next epoch.

The sources are interleaved by tokens, as weighted fair queueing does: an item's key is the midpoint of its tokens
within its source's tokens of the epoch, and the epoch is the items in key order. Any window of steps then carries
every source at its share, not just the whole epoch. All of it is a pure function of (seed, epoch): the same on any
world size, rebuilt as it was on a resume.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from launch.data.packing import TokenizedData

log = logging.getLogger("launch.data")


@dataclass
class MixtureSource:
    name: str
    data: TokenizedData
    weight: float | None  # share of the mixture's tokens, normalised over the weighted sources
    epochs: float | None  # or passes per epoch of the mixture


class Mixture:
    """The sources' items as one dataset: global index = the source's offset + its item index; `order(epoch)` is the
    epoch's sequence of global indices (`items_per_epoch` of them) that the global-batch sampler walks."""

    def __init__(self, sources: list[MixtureSource], seed: int) -> None:
        self.sources, self.seed = sources, seed
        self.names = [s.name for s in sources]
        self.sizes = [len(s.data.dataset) for s in sources]
        self.starts = np.cumsum([0, *self.sizes])
        self.item_lengths = [np.asarray(s.data.dataset.lengths, np.int64) for s in sources]
        tokens = [int(lengths.sum()) for lengths in self.item_lengths]
        weighted = [i for i, s in enumerate(sources) if s.weight is not None]
        weight_sum = sum(sources[i].weight for i in weighted)
        weighted_tokens = sum(tokens[i] for i in weighted)
        self.counts, targets = [], []
        for i, source in enumerate(sources):
            if source.epochs is not None:
                count, target = round(source.epochs * self.sizes[i]), source.epochs * tokens[i]
            else:
                target = source.weight / weight_sum * weighted_tokens
                count = round(target / (tokens[i] / self.sizes[i]))
            self.counts.append(max(1, count))
            targets.append(target)
        self.items_per_epoch = sum(self.counts)
        self.target_shares = [t / sum(targets) for t in targets]
        self._epoch, self._order = -1, np.zeros(0, np.int64)
        self._lengths: np.ndarray | None = None

    # ---- the dataset view
    def __len__(self) -> int:
        return int(self.starts[-1])

    def source_of(self, index: int) -> int:
        return int(np.searchsorted(self.starts, index, side="right")) - 1

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        i = self.source_of(index)
        return self.sources[i].data.dataset[int(index - self.starts[i])]

    def supervised_count(self, index: int) -> int:
        i = self.source_of(index)
        return self.sources[i].data.dataset.supervised_count(int(index - self.starts[i]))

    @property
    def lengths(self) -> np.ndarray:
        """Real tokens per item, by global index."""
        if self._lengths is None:
            self._lengths = np.concatenate(self.item_lengths)
        return self._lengths

    # ---- the order
    def stream(self, i: int, first: int, count: int) -> np.ndarray:
        """Items `first` .. `first + count` of source i's endless stream (local indices): pass p is a permutation
        seeded by (seed, i, p)."""
        n, out = self.sizes[i], np.empty(count, np.int64)
        for p in range(first // n, (first + count - 1) // n + 1):  # the passes the range touches, a slice of each
            lo, hi = max(first, p * n), min(first + count, (p + 1) * n)
            permutation = np.random.default_rng([self.seed % 2**64, i, p]).permutation(n)
            out[lo - first : hi - first] = permutation[lo - p * n : hi - p * n]
        return out

    def order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            items, keys, owners = [], [], []
            for i, count in enumerate(self.counts):
                local = self.stream(i, epoch * count, count)
                lengths = self.item_lengths[i][local].astype(np.float64)
                ends = np.cumsum(lengths)
                keys.append((ends - lengths / 2) / ends[-1])  # the item's midpoint in its source's epoch budget
                items.append(local + self.starts[i])
                owners.append(np.full(count, i))
            items, keys, owners = np.concatenate(items), np.concatenate(keys), np.concatenate(owners)
            self._epoch, self._order = epoch, items[np.lexsort((owners, keys))]
        return self._order

    def plan(self) -> dict[str, dict]:
        """Per source: its weight or epochs, its items, and the share of an epoch's tokens it is meant to get."""
        return {name: {"weight": s.weight, "epochs": s.epochs, "items": size, "items_per_epoch": count,
                       "target_share": round(share, 6)}
                for name, s, size, count, share in zip(self.names, self.sources, self.sizes, self.counts,
                                                       self.target_shares)}  # fmt: skip


def mix(sources: list[tuple[str, TokenizedData, float | None, float | None]], seed: int) -> TokenizedData:
    """(name, items, weight, epochs) of each source -> one TokenizedData over a Mixture (all packed, or none: they
    share --data.packing)."""
    sources = [MixtureSource(*source) for source in sources]
    mixture = Mixture(sources, seed)
    for name, plan in mixture.plan().items():
        given = f"weight {plan['weight']:g}" if plan["weight"] is not None else f"{plan['epochs']:g} epochs"
        log.info("mixture: %s (%s): %d items, %d per epoch, %.1f%% of the tokens", name, given, plan["items"],
                 plan["items_per_epoch"], 100 * plan["target_share"])  # fmt: skip
    datas = [s.data for s in sources]
    real = [int(lengths.sum()) for lengths in mixture.item_lengths]
    padding = sum(d.padding_fraction * t for d, t in zip(datas, real)) / max(1, sum(real))
    return TokenizedData(mixture, datas[0].packed, all(d.from_cache for d in datas), sum(d.overlong for d in datas),
                         padding)  # fmt: skip
