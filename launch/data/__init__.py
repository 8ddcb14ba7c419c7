"""The SFT data pipeline. A row flows through these stages in order; this file feeds each stage the previous one's
output, and no stage calls back into an earlier one:

  1. sources       a file, glob, parquet shards or Hub dataset -> its rows, in independently readable parts
  2. conversation  a row -> a conversation, per --data.format (every problem named at its file:line)
  3. backbones.prompting   a conversation -> prompt text and answer spans, in the model family's format
  4. tokenize      a prompt -> token ids and labels (-100 except the answers and their end-of-turn token)
  5. cache         ids and labels -> a cache entry on disk (forked workers, bounded memory, resumable) -> examples
                   read back through memory maps
  6. packing       examples -> packed rows, and micro-batches: padded, packed, or padding-free flat rows
  7. sampler       items -> world-size-invariant global batches, split into ranks and micro-steps

`build_tokenized` runs stages 1-6 for one split; the trainer takes stage 7 and `collate`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable

from backbones.base import LLMBackbone
from backbones.tiny import cache_root
from launch.bundled_data import bundled_path
from launch.config import DataConfig
from launch.data.cache import (
    IGNORE_INDEX,
    MANIFEST,
    Encoder,
    TokenizedExamples,
    TokenizingStopped,
    build_entry,
    file_lock,
)
from launch.data.conversation import row_to_conversation
from launch.data.packing import TokenizedData, batch_layout, collate, pack, plan_packing
from launch.data.sampler import GlobalBatchSampler
from launch.data.sources import DataError, open_source
from launch.data.tokenize import encode_prompt, encode_prompts

__all__ = ["IGNORE_INDEX", "DataError", "GlobalBatchSampler", "TokenizedData", "TokenizingStopped", "batch_layout",
           "build_tokenized", "collate", "encode_prompt", "plan_packing"]  # fmt: skip
log = logging.getLogger("launch.data")
# Bump when tokenization changes: cache entries written by older code must not be reused.
# v5: parts of memory-mapped arrays (ids, supervised mask, offsets) instead of an Arrow dataset; v6: answer counts
TOKENIZATION_VERSION = "v6"
# A token covers at most this many characters in practice: text beyond max_length x this is never needed.
CHARS_PER_TOKEN_BOUND = 32
# The data settings that decide an entry's content (the split, packing and memory do not).
TOKENIZATION_FIELDS = ("format", "instruction_field", "input_field", "output_field", "messages_field", "text_field",
                       "max_length", "overlong")  # fmt: skip


def resolve_path(data: DataConfig, split: str) -> str | None:
    """The file or Hub id for `split` ("train" or "eval")."""
    if data.path == "bundled" and (split == "train" or data.eval_path in (None, "bundled")):
        return str(bundled_path(data.format, split))
    return data.path if split == "train" else data.eval_path


def build_tokenized(data: DataConfig, backbone: LLMBackbone, split: str, packing: bool | None = None,
                    should_stop: Callable[[], bool] = lambda: False) -> TokenizedData:  # fmt: skip
    """Stages 1-6 for `split`: read the source, tokenize it into the cache (once per node: the first process to take
    the entry's lock builds it, the others wait, then read it), apply `data.overlong`, and pack when asked."""
    path = resolve_path(data, split)
    flag = "--data.path" if split == "train" else "--data.eval_path"
    if path is None:
        raise DataError(f"no {split} data: give {flag}")
    source = open_source(path, data.split if split == "train" else data.eval_split, flag)  # 1
    tokenizer = backbone.tokenizer
    builder = backbone.prompt_builder_fn(backbone.identifier)
    settings = {k: getattr(data, k) for k in TOKENIZATION_FIELDS}
    parts = [TOKENIZATION_VERSION, source.digest, backbone.identifier, type(builder).__qualname__,
             tokenizer.backend_tokenizer.to_str(), json.dumps(settings, sort_keys=True)]  # fmt: skip
    key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]
    entry = cache_root() / "tokenized" / key
    with file_lock(entry.parent / f".{key}.lock"):
        from_cache = (entry / MANIFEST).is_file()
        if not from_cache:
            build_entry(source, encoder(data, builder, tokenizer), entry, data.max_length, data.tokenize_memory_mb,
                        should_stop)  # fmt: skip
    examples = TokenizedExamples(entry)  # 5: read back, memory-mapped
    counts = examples.manifest
    if counts["rows"] == 0:
        raise DataError(f"{path}: the dataset is empty; expected at least one example")
    if len(examples) == 0:
        raise DataError(f"{path}: every example is longer than --data.max_length={data.max_length}")
    if counts.get("answers") and counts["answers"] == counts.get("empty_answers"):
        raise DataError(f"{path}: every assistant answer is empty ({counts['answers']} answers in {counts['rows']} "
                        "rows); nothing would be learned but to stop")  # fmt: skip
    if counts.get("empty_answers"):
        log.warning("%s: %d of %d assistant answers are empty (the model learns to stop at once there)", path,
                    counts["empty_answers"], counts["answers"])  # fmt: skip
    if counts["supervised"] == 0:
        raise DataError(f"{path}: no example has a supervised token (every answer is empty or cut off by "
                        f"--data.max_length={data.max_length}); nothing would be learned")  # fmt: skip
    overlong = counts["rows"] - len(examples) if data.overlong == "drop" else counts["overlong"]
    if overlong:
        log.info("%s: %d of %d examples longer than %d tokens were %s", split, overlong, counts["rows"],
                 data.max_length, "dropped" if data.overlong == "drop" else "truncated")  # fmt: skip
    if packing if packing is not None else data.packing:
        return pack(examples, data.max_length, tokenizer.pad_token_id, from_cache, overlong)  # 6
    return TokenizedData(examples, packed=False, from_cache=from_cache, overlong=overlong)


def encoder(data: DataConfig, builder, tokenizer) -> Encoder:
    """Stages 2-4 for a batch of rows, run inside the cache's workers: conversation, prompt, ids and labels.
    Overlong examples are flagged (truncated later) or, with --data.overlong drop, left out."""
    max_chars = CHARS_PER_TOKEN_BOUND * data.max_length

    def encode(rows):
        prompts, answers = [], []
        for row, place in rows:
            conversation = row_to_conversation(row, data, place)  # 2
            answers += [answer for _, answer in conversation.turns]
            if conversation.text is not None:  # 3
                prompts.append(builder.build_text(conversation.text))
            else:
                prompts.append(builder.build(conversation.turns, system=conversation.system))
        kept, chars = [], 0
        for prompt, (ids, labels) in zip(prompts, encode_prompts(prompts, tokenizer, max_chars)):  # 4
            size = sum(len(chunk.text) for chunk in prompt.chunks)
            chars += size
            long = len(ids) > data.max_length or size > max_chars
            if not (long and data.overlong == "drop"):
                kept.append((ids, labels, long))
        return kept, chars, {"answers": len(answers), "empty_answers": sum(not a.strip() for a in answers)}

    return encode
