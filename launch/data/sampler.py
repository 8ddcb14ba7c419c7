"""Stage 8 of the data pipeline, global batches: global step s of an epoch takes items (examples or packed rows)
[s*G, (s+1)*G) of the epoch's order (G = global batch): a seeded permutation, or a mixture's interleaving. Then it
splits them across ranks and micro-batches. One process and eight see the same global batches, so loss curves,
resumption and world-size changes stay comparable."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class GlobalBatchSampler:
    """`lengths` (padded batches): each global batch is sorted by length before it is split into micro-batches, so a
    micro-batch pads to its own longest example, not the batch's. The global batch, its loss and world-size invariance
    are unchanged: only which rank and micro-step computes an example moves."""

    def __init__(self, num_examples: int, global_batch_size: int, seed: int, lengths: Sequence[int] | None = None,
                 epoch_order: Callable[[int], Sequence[int]] | None = None) -> None:  # fmt: skip
        """`num_examples` items per epoch, in a seeded permutation, or in `epoch_order(epoch)` (a mixture's)."""
        if num_examples < global_batch_size:
            raise ValueError(
                f"{num_examples} training examples cannot fill one global batch of {global_batch_size}; "
                "lower --train.global_batch_size or add data"
            )
        self.num_examples = num_examples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.lengths = lengths
        self.epoch_order = epoch_order
        # The incomplete last global batch of each epoch is dropped, as with DistributedSampler(drop_last=True).
        self.steps_per_epoch = num_examples // global_batch_size
        self._epoch, self._order = -1, None

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, offset within epoch) of global step `step` (0-based): what a checkpoint records."""
        return divmod(step, self.steps_per_epoch)

    def order(self, epoch: int) -> Sequence[int]:
        if self.epoch_order is not None:
            return self.epoch_order(epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.num_examples, generator=generator).tolist()
        return self._order

    def global_batch(self, step: int) -> list[int]:
        epoch, offset = self.position(step)
        batch = self.order(epoch)[offset * self.global_batch_size : (offset + 1) * self.global_batch_size]
        return [int(i) for i in batch]

    def micro_batches(self, step: int, rank: int, world_size: int, micro_batch_size: int) -> list[list[int]]:
        """This rank's micro-batches for `step`: a contiguous 1/world_size slice of the global batch, in chunks."""
        per_rank = self.global_batch_size // world_size
        batch = self.global_batch(step)
        if self.lengths is not None:
            batch = sorted(batch, key=lambda i: (self.lengths[i], i))
        mine = batch[rank * per_rank : (rank + 1) * per_rank]
        return [mine[i : i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]
