"""Supervised token data: prompt-built text -> token ids and labels (-100 except assistant answers and their EOS),
cached on disk; optional packing; and collation into padded or packed micro-batches."""

from __future__ import annotations

import bisect
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import torch

from backbones.base import LLMBackbone
from backbones.prompting import BOS, Prompt
from backbones.tiny import cache_root
from launch.attention import takes_flat_batches
from launch.config import DataConfig
from launch.data_sources import DataError, RowPlace, load_rows, render_row, resolve_path

log = logging.getLogger(__name__)
IGNORE_INDEX = -100
# Bump when tokenization below changes: cached token files from older code must not be reused.
# v2: per-chunk encoding, text never parsed for special tokens; v3: length column; v4: int32, dropped examples left out
TOKENIZATION_VERSION = "v4"
# A token covers at most this many characters in practice: text beyond max_length x this is never needed.
CHARS_PER_TOKEN_BOUND = 32


def encode_prompts(prompts: list[Prompt], tokenizer, max_chars: int = 0) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels (-100 where not supervised) of each prompt. Each text chunk is tokenized alone, as the
    family's reference does, and as text only (`split_special_tokens`: `</s>` written by a user stays characters);
    BOS/EOS chunks are the tokenizer's ids. A text token is supervised when its characters overlap a supervised span.
    All chunks of all prompts go to the fast tokenizer in one call. `max_chars` (if set) cuts a prompt's text after
    that many characters: far beyond max_length tokens, it only saves tokenizing what truncation would drop."""
    texts, spans = [], []
    for prompt in prompts:
        budget = max_chars or -1
        for chunk in prompt.chunks:
            if not chunk.special:
                texts.append(chunk.text if budget < 0 else chunk.text[:budget])
                spans.append(chunk.spans)
                budget = budget if budget < 0 else max(0, budget - len(chunk.text))
    pieces = iter(zip(encode_texts(texts, tokenizer), spans))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out = []
    for prompt in prompts:
        ids, labels = [], []
        for chunk in prompt.chunks:
            if chunk.special:
                token = bos if chunk.special == BOS else eos
                ids.append(token)
                labels.append(token if chunk.supervised else IGNORE_INDEX)
                continue
            encoding, chunk_spans = next(pieces)
            ids += encoding.ids
            labels += supervised(encoding, chunk_spans)
        out.append((ids, labels))
    return out


def encode_texts(texts: list[str], tokenizer) -> list:
    """The backend (Rust) tokenizer's encodings of `texts`, as `tokenizer(texts, add_special_tokens=False,
    split_special_tokens=True)` computes them, without building its Python dicts (half the time of a batch)."""
    backend = tokenizer.backend_tokenizer
    if backend.truncation is not None or backend.padding is not None:  # as the tokenizer's own call without them
        backend.no_truncation()
        backend.no_padding()
    saved, backend.encode_special_tokens = backend.encode_special_tokens, True
    try:
        return backend.encode_batch(texts, add_special_tokens=False)
    finally:
        backend.encode_special_tokens = saved


def supervised(encoding, spans: list[tuple[int, int]]) -> list[int]:
    """Labels of one text chunk's tokens: the id where a token's characters overlap a supervised span, else -100.
    Token offsets rise along the text, so the tokens of a span [a, b) are a run from the first token covering
    character a to the last covering b - 1 (byte-fallback tokens of one character share its offsets): two lookups in
    the Rust encoding instead of reading every token's offsets, a third of the time of tokenizing a row."""
    ids = encoding.ids
    labels = [IGNORE_INDEX] * len(ids)
    for a, b in spans:
        first, last = encoding.char_to_token(a), encoding.char_to_token(b - 1)
        if first is None or last is None:  # an end character no token covers: check every token
            return supervised_by_offsets(ids, encoding.offsets, spans)
        while last + 1 < len(ids) and encoding.token_to_chars(last + 1)[0] < b:
            last += 1
        labels[first : last + 1] = ids[first : last + 1]
    return labels


def supervised_by_offsets(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """The definition, token by token: supervised when a token's characters overlap a span (a token of none, never)."""
    return [t if e > s and any(s < b and e > a for a, b in spans) else IGNORE_INDEX for t, (s, e) in zip(ids, offsets)]


def encode_prompt(prompt: Prompt, tokenizer) -> tuple[list[int], list[int]]:
    return encode_prompts([prompt], tokenizer)[0]


@dataclass
class TokenizedData:
    dataset: datasets.Dataset | PackedRows  # rows of input_ids, labels (and position_ids, lengths when packed)
    packed: bool
    from_cache: bool
    overlong: int  # examples truncated or dropped
    padding_fraction: float = 0.0  # packed rows only


def build_tokenized(data: DataConfig, backbone: LLMBackbone, split: str, packing: bool | None = None) -> TokenizedData:
    """Load (Arrow), check, tokenize (cached by content, built once per node), apply `data.overlong`, and pack when
    asked. The first process to take the cache entry's lock builds it; the others wait, then read it."""
    source = resolve_path(data, split)
    if source is None:
        raise DataError(f"no {split} data: give --data.{'path' if split == 'train' else 'eval_path'}")
    rows, digest, where = load_rows(source, data.split if split == "train" else data.eval_split)
    if len(rows) == 0:
        raise DataError(f"{source}: the dataset is empty; expected at least one example")
    tokenizer = backbone.tokenizer
    parts = [TOKENIZATION_VERSION, digest, backbone.identifier, tokenizer.backend_tokenizer.to_str(),
             repr(sorted(vars(data).items()))]  # fmt: skip
    key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]
    cache_dir = cache_root() / "tokenized" / key
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(cache_dir.parent / f".{key}.lock"):
        from_cache = (cache_dir / "dataset_info.json").is_file()
        if not from_cache:
            builder = backbone.prompt_builder_fn(backbone.identifier)
            tokenized = tokenize(rows, data, builder, tokenizer, where)
            if len(tokenized) == 0:  # only `--data.overlong drop` leaves nothing (and nothing is cached)
                raise DataError(f"{source}: every example is longer than --data.max_length={data.max_length}")
            save_atomically(tokenized, cache_dir)
    dataset = datasets.load_from_disk(str(cache_dir))  # memory-mapped
    # tokenize() left overlong examples out when they are dropped, and flagged them when they are truncated
    overlong = len(rows) - len(dataset) if data.overlong == "drop" else int(column(dataset, "overlong").sum())
    dataset = dataset.remove_columns("overlong")
    if overlong:
        log.info("%s: %d of %d examples longer than %d tokens were %s", split, overlong, len(rows), data.max_length,
                 "dropped" if data.overlong == "drop" else "truncated")  # fmt: skip
    if packing if packing is not None else data.packing:
        return pack(dataset, data.max_length, tokenizer.pad_token_id, from_cache, overlong)
    return TokenizedData(dataset, packed=False, from_cache=from_cache, overlong=overlong)


# int32 token ids: half the disk and page cache of Arrow's default int64 (vocabularies are far below 2**31)
TOKENIZED_FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")), "labels": datasets.List(datasets.Value("int32")),
    "length": datasets.Value("int32"), "overlong": datasets.Value("bool")})  # fmt: skip


def tokenize(rows: datasets.Dataset, data: DataConfig, builder, tokenizer, where) -> datasets.Dataset:
    """Rows -> input_ids, labels, length, overlong, in batches through the fast tokenizer (several processes for large
    datasets), written to Arrow as it goes: no list of all rows is ever held. With `--data.overlong drop` the overlong
    examples are left out here (a filtered dataset's index mapping would make every later column read slow)."""
    max_chars = CHARS_PER_TOKEN_BOUND * data.max_length

    def batch(columns: dict[str, list], indices: list[int]) -> pa.Table:
        prompts = [render_row({k: v[i] for k, v in columns.items()}, data, builder, RowPlace(where, index))
                   for i, index in enumerate(indices)]  # fmt: skip
        ids_flat, labels_flat, ends, lengths, flags = [], [], [0], [], []
        for prompt, (ids, labels) in zip(prompts, encode_prompts(prompts, tokenizer, max_chars)):
            long = len(ids) > data.max_length or sum(len(c.text) for c in prompt.chunks) > max_chars
            if long and data.overlong == "drop":
                continue
            n = min(len(ids), data.max_length)
            ids_flat += ids[:n]
            labels_flat += labels[:n]
            ends.append(ends[-1] + n)
            lengths.append(n)
            flags.append(long)
        # Arrow arrays built here from flat lists: `datasets` inferring them from lists of lists costs more per row
        ends = pa.array(ends, pa.int32())
        columns = [pa.ListArray.from_arrays(ends, pa.array(ids_flat, pa.int32())),
                   pa.ListArray.from_arrays(ends, pa.array(labels_flat, pa.int32())),
                   pa.array(lengths, pa.int32()), pa.array(flags, pa.bool_())]  # fmt: skip
        return pa.Table.from_arrays(columns, schema=TOKENIZED_FEATURES.arrow_schema)

    processes = min(os.cpu_count() or 1, 8) if len(rows) >= 50_000 else None
    datasets.enable_progress_bars()  # tokenizing a large dataset takes a while: show it (rank 0 builds)
    try:
        return rows.map(batch, batched=True, batch_size=1000, with_indices=True, num_proc=processes,
                        remove_columns=rows.column_names, desc="tokenizing", load_from_cache_file=False,
                        features=TOKENIZED_FEATURES)  # fmt: skip
    finally:
        datasets.disable_progress_bars()


def column(dataset: datasets.Dataset, name: str) -> np.ndarray:
    """One column as a NumPy array, read in one piece (a `datasets` Column read row by row costs ~60 us a row)."""
    return dataset.with_format("numpy", columns=[name])[:][name]


@contextmanager
def file_lock(path: Path):
    """An exclusive flock: one process builds a cache entry while the others wait (released if the holder dies)."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def save_atomically(dataset: datasets.Dataset, target: Path) -> None:
    """Write under a temporary name and rename: a concurrent or interrupted writer never leaves a partial cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    dataset.save_to_disk(str(tmp))
    try:
        os.rename(tmp, target)
    except OSError:  # another rank cached the same content first
        shutil.rmtree(tmp, ignore_errors=True)


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
    """Packed rows as a view over the tokenized examples (Arrow, memory-mapped): a row is assembled when it is read,
    so packing copies nothing. Position ids restart per example so that, with no attention mask, transformers keeps
    attention within each example (the padding tail is a segment of its own); `lengths` lets flash kernels drop the
    tail and take exact boundaries."""

    def __init__(self, examples: datasets.Dataset, bins: list[list[int]], max_length: int, pad_id: int) -> None:
        self.examples, self.bins, self.max_length, self.pad_id = examples, bins, max_length, pad_id

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        rows = self.examples[self.bins[index]]  # one Arrow read for the whole bin
        ids = [t for row in rows["input_ids"] for t in row]
        labels = [t for row in rows["labels"] for t in row]
        lengths = [len(row) for row in rows["input_ids"]]
        pad = self.max_length - len(ids)
        return {
            "input_ids": ids + [self.pad_id] * pad,
            "labels": labels + [IGNORE_INDEX] * pad,
            "position_ids": [p for n in lengths for p in range(n)] + list(range(pad)),
            "lengths": lengths,
        }


def pack(dataset: datasets.Dataset, max_length: int, pad_id: int, from_cache: bool, overlong: int,
         seed: int = 0) -> TokenizedData:  # fmt: skip
    """Best-fit-decreasing packing into rows of `max_length` (see plan_packing and PackedRows)."""
    lengths = column(dataset, "length").tolist()
    bins = plan_packing(lengths, max_length, seed)
    padding = 1.0 - sum(lengths) / (len(bins) * max_length)
    log.info("packed %d examples into %d rows of %d tokens; padding fraction %.4f", len(dataset), len(bins),
             max_length, padding)  # fmt: skip
    return TokenizedData(PackedRows(dataset, bins, max_length, pad_id), True, from_cache, overlong, padding)


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
