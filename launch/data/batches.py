"""Stage 9 of the data pipeline, micro-batches: the items the sampler gave this rank and micro-step -> tensors, in one
of three layouts: padded rows, packed rows, or one padding-free flat row with the cumulative lengths flash kernels
take (`batch_layout` picks it from the attention kernel and --data.packing).
"""

from __future__ import annotations

import torch

from launch.attention import takes_flat_batches
from launch.data.cache import IGNORE_INDEX


def micro_batch(items, indices: list[int], pad_id: int, layout: str, bucket: int = 1
                ) -> tuple[dict[str, torch.Tensor | int], list[int]]:  # fmt: skip
    """The micro-batch of `items[i]` for `indices` (the sampler's), collated, and its examples' real lengths."""
    examples = [items[i] for i in indices]
    lengths = [n for e in examples for n in (e.get("lengths") or [len(e["input_ids"])])]
    return collate(examples, pad_id, layout, bucket), lengths


def collate(examples: list[dict], pad_id: int, layout: str, bucket: int = 1) -> dict[str, torch.Tensor | int]:
    """A micro-batch in one of three layouts:
    - `padded`: right-padded rows with an attention mask;
    - `packed`: packed rows with per-example position ids and no mask (SDPA/eager build a per-example mask);
    - `flat`: every example's real tokens in one row (a packed row's padding tail dropped), position ids restarting
      per example, and the cumulative lengths that flash kernels take (`cu_seq_lens_q/k`, `max_length_q/k`, as
      `DataCollatorWithFlattening(return_flash_attn_kwargs=True)` emits). transformers hands flash kernels a batch of
      several rows as plain causal rows, attending across packed examples: only one flattened row is safe.
    `bucket` rounds padded widths and the flat path's max_length up to a multiple (stable shapes for torch.compile;
    max_length is only an upper bound for flash kernels).
    """
    if layout == "flat":
        return collate_flat(examples, bucket)
    if layout == "packed":
        return {key: torch.tensor([e[key] for e in examples]) for key in ("input_ids", "labels", "position_ids")}
    width = round_up(max(len(e["input_ids"]) for e in examples), bucket)
    batch = {
        "input_ids": torch.full((len(examples), width), pad_id),
        "labels": torch.full((len(examples), width), IGNORE_INDEX),
        "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),
    }
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["input_ids"][row, :n] = torch.tensor(e["input_ids"])
        batch["labels"][row, :n] = torch.tensor(e["labels"])
        batch["attention_mask"][row, :n] = 1
    return batch


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def collate_flat(examples: list[dict], bucket: int = 1) -> dict[str, torch.Tensor | int]:
    ids, labels, lengths = [], [], []
    for e in examples:
        segments = e.get("lengths") or [len(e["input_ids"])]
        real = sum(segments)
        ids += e["input_ids"][:real]
        labels += e["labels"][:real]
        lengths += segments
    starts = torch.tensor([0, *lengths]).cumsum(0)
    labels_t = torch.tensor(labels)
    # An example's first token is never predicted from the previous example's last one.
    labels_t[starts[:-1]] = IGNORE_INDEX
    cu_seq_lens = starts.to(torch.int32)
    return {
        "input_ids": torch.tensor([ids]),
        "labels": labels_t[None],
        "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": round_up(max(lengths), bucket),
        "max_length_k": round_up(max(lengths), bucket),
    }


def batch_layout(packed: bool, attn_implementation: str) -> str:
    if takes_flat_batches(attn_implementation):
        return "flat"
    return "packed" if packed else "padded"
