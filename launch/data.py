"""Supervised token data: prompt-built text -> token ids and labels (-100 except assistant answers and their EOS),
cached on disk; optional packing; and collation into padded or packed micro-batches."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch

from backbones.base import LLMBackbone
from backbones.prompting import BOS, Prompt
from backbones.tiny import cache_root
from launch.attention import takes_flat_batches
from launch.config import DataConfig
from launch.data_sources import DataError, read_rows, render_row, resolve_path

log = logging.getLogger(__name__)
IGNORE_INDEX = -100
# Bump when tokenization below changes: cached token files from older code must not be reused.
TOKENIZATION_VERSION = "v2"  # v2: per-chunk encoding, text never parsed for special tokens


def encode_prompt(prompt: Prompt, tokenizer) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 where not supervised). Each text chunk is tokenized alone, as the family's reference
    does, and as text only (`split_special_tokens`: `</s>` written by a user stays characters); BOS/EOS chunks are the
    tokenizer's ids. A text token is supervised when its characters overlap a supervised span."""
    ids, labels = [], []
    for chunk in prompt.chunks:
        if chunk.special:
            token = tokenizer.bos_token_id if chunk.special == BOS else tokenizer.eos_token_id
            ids.append(token)
            labels.append(token if chunk.supervised else IGNORE_INDEX)
            continue
        encoding = tokenizer(chunk.text, add_special_tokens=False, return_offsets_mapping=True,
                             split_special_tokens=True)  # fmt: skip
        for token, (start, end) in zip(encoding["input_ids"], encoding["offset_mapping"]):
            supervised = end > start and any(start < b and end > a for a, b in chunk.spans)
            ids.append(token)
            labels.append(token if supervised else IGNORE_INDEX)
    return ids, labels


@dataclass
class TokenizedData:
    dataset: datasets.Dataset  # columns input_ids, labels (and position_ids when packed)
    packed: bool
    from_cache: bool
    overlong: int  # examples truncated or dropped
    padding_fraction: float = 0.0  # packed rows only


def build_tokenized(data: DataConfig, backbone: LLMBackbone, split: str, packing: bool | None = None) -> TokenizedData:
    """Load, check, tokenize (cached by content), apply `data.overlong`, and pack when asked."""
    source = resolve_path(data, split)
    if source is None:
        raise DataError(f"no {split} data: give --data.{'path' if split == 'train' else 'eval_path'}")
    rows, digest = read_rows(source, data.split if split == "train" else data.eval_split)
    if not rows:
        raise DataError(f"{source}: the dataset is empty; expected at least one example")
    tokenizer = backbone.tokenizer
    key = hashlib.sha256(
        "|".join(
            [
                TOKENIZATION_VERSION,
                digest,
                backbone.identifier,
                tokenizer.backend_tokenizer.to_str(),
                repr(sorted(vars(data).items())),
            ]
        ).encode()
    ).hexdigest()[:24]
    cache_dir = cache_root() / "tokenized" / key
    if (cache_dir / "dataset_info.json").is_file():
        dataset, from_cache = datasets.load_from_disk(str(cache_dir)), True
    else:
        builder = backbone.prompt_builder_fn(backbone.identifier)
        records = {"input_ids": [], "labels": [], "overlong": []}
        jsonl = source.endswith(".jsonl")
        for i, row in enumerate(rows):
            where = f"{source}:{i + 1}" if jsonl else f"{source} row {i}"
            ids, labels = encode_prompt(render_row(row, data, builder, where), tokenizer)
            records["overlong"].append(len(ids) > data.max_length)
            records["input_ids"].append(ids[: data.max_length])
            records["labels"].append(labels[: data.max_length])
        dataset, from_cache = datasets.Dataset.from_dict(records), False
        save_atomically(dataset, cache_dir)
    overlong = sum(dataset["overlong"])
    if data.overlong == "drop" and overlong:
        dataset = dataset.filter(lambda flag: not flag, input_columns="overlong")
        if len(dataset) == 0:
            raise DataError(f"{source}: every example is longer than --data.max_length={data.max_length}")
    dataset = dataset.remove_columns("overlong")
    if overlong:
        log.info(
            "%s: %d of %d examples longer than %d tokens were %s",
            split,
            overlong,
            len(rows),
            data.max_length,
            "dropped" if data.overlong == "drop" else "truncated",
        )
    if packing if packing is not None else data.packing:
        return pack(dataset, data.max_length, tokenizer.pad_token_id, from_cache, overlong)
    return TokenizedData(dataset.with_format("python"), packed=False, from_cache=from_cache, overlong=overlong)


def save_atomically(dataset: datasets.Dataset, target: Path) -> None:
    """Write under a temporary name and rename: a concurrent or interrupted writer never leaves a partial cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    dataset.save_to_disk(str(tmp))
    try:
        os.rename(tmp, target)
    except OSError:  # another rank cached the same content first
        shutil.rmtree(tmp, ignore_errors=True)


def pack(dataset: datasets.Dataset, max_length: int, pad_id: int, from_cache: bool, overlong: int) -> TokenizedData:
    """Greedy in-order packing into rows of `max_length`; position ids restart per example so that, with no
    attention mask, transformers keeps attention within each example (and the padding tail is its own segment).
    `lengths` records each row's examples, so flash kernels can drop the padding tail and take exact boundaries."""
    rows = {"input_ids": [], "labels": [], "position_ids": [], "lengths": []}
    current = {k: [] for k in rows}

    def flush() -> None:
        pad = max_length - len(current["input_ids"])
        rows["input_ids"].append(current["input_ids"] + [pad_id] * pad)
        rows["labels"].append(current["labels"] + [IGNORE_INDEX] * pad)
        rows["position_ids"].append(current["position_ids"] + list(range(pad)))
        rows["lengths"].append(current["lengths"])
        for k in current:
            current[k] = []

    for ids, labels in zip(dataset["input_ids"], dataset["labels"]):
        if len(current["input_ids"]) + len(ids) > max_length:
            flush()
        current["input_ids"] += ids
        current["labels"] += labels
        current["position_ids"] += list(range(len(ids)))
        current["lengths"].append(len(ids))
    if current["input_ids"]:
        flush()
    real = sum(len(ids) for ids in dataset["input_ids"])
    padding = 1.0 - real / (len(rows["input_ids"]) * max_length)
    log.info(
        "packed %d examples into %d rows of %d tokens; padding fraction %.3f",
        len(dataset),
        len(rows["input_ids"]),
        max_length,
        padding,
    )
    return TokenizedData(datasets.Dataset.from_dict(rows).with_format("python"), True, from_cache, overlong, padding)


def collate(examples: list[dict], pad_id: int, layout: str) -> dict[str, torch.Tensor | int]:
    """A micro-batch in one of three layouts:
    - `padded`: right-padded rows with an attention mask;
    - `packed`: packed rows with per-example position ids and no mask (SDPA/eager build a per-example mask);
    - `flat`: every example's real tokens in one row (a packed row's padding tail dropped), position ids restarting
      per example, and the cumulative lengths that flash kernels take (`cu_seq_lens_q/k`, `max_length_q/k`, as
      `DataCollatorWithFlattening(return_flash_attn_kwargs=True)` emits). transformers hands flash kernels a batch of
      several rows as plain causal rows, attending across packed examples: only one flattened row is safe.
    """
    if layout == "flat":
        return collate_flat(examples)
    if layout == "packed":
        return {key: torch.tensor([e[key] for e in examples]) for key in ("input_ids", "labels", "position_ids")}
    width = max(len(e["input_ids"]) for e in examples)
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


def collate_flat(examples: list[dict]) -> dict[str, torch.Tensor | int]:
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
        "max_length_q": max(lengths),
        "max_length_k": max(lengths),
    }


def batch_layout(packed: bool, attn_implementation: str) -> str:
    if takes_flat_batches(attn_implementation):
        return "flat"
    return "packed" if packed else "padded"
