"""The SFT data pipeline. A row flows through these stages in order; this file hands each stage the previous one's
output (a batch of rows at a time), and no stage calls a later one:

  1. sources       a file, glob, parquet shards or Hub dataset -> its rows, in independently readable parts
  2. conversation  a row -> a conversation, per --data.format (every problem named at its file:line)
  3. backbones.prompting   a conversation -> prompt text and answer spans, in the model family's format
  4. tokenize      a prompt -> token ids and labels (-100 except the answers and their end-of-turn token)
  5. cache         ids and labels -> a cache entry on disk (resumable, part by part) -> examples read back through
                   memory maps
  6. packing       examples -> the items of a split: examples, or best-fit packed rows
  7. mixture       several sources' items -> one dataset, each epoch interleaved by token share (data.sources)
  8. sampler       items -> world-size-invariant global batches, split into ranks and micro-steps
  9. batches       a micro-step's items -> tensors: padded, packed, or one padding-free flat row

`build_data` runs stages 1-6 for one split of `--data.path`, or for every source of `data.sources` and then stage 7;
the trainer takes stages 8 and 9. Stages 1-5 run per part, inline or in forked workers (workers.py, which also holds
the node-wide lock and the progress line): memory is bounded per process by --data.tokenize_memory_mb.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from itertools import islice
from pathlib import Path

from backbones.base import LLMBackbone
from backbones.tiny import cache_root
from launch.bundled_data import bundled_path
from launch.config import DataConfig, source_data, source_name
from launch.data.batches import batch_layout, collate, micro_batch
from launch.data.cache import IGNORE_INDEX, MANIFEST, PART, PartWriter, TokenizedExamples, write_manifest
from launch.data.conversation import row_to_conversation
from launch.data.mixture import Mixture, mix
from launch.data.packing import TokenizedData, pack, plan_packing
from launch.data.sampler import GlobalBatchSampler
from launch.data.sources import DataError, Part, Source, open_source
from launch.data.tokenize import encode_prompt, encode_prompts
from launch.data.workers import BuildProgress, TokenizingStopped, batch_chars, file_lock, run_parts

__all__ = ["IGNORE_INDEX", "DataError", "GlobalBatchSampler", "Mixture", "TokenizedData", "TokenizingStopped",
           "batch_layout", "build_data", "build_tokenized", "collate", "encode_prompt", "micro_batch",
           "plan_packing"]  # fmt: skip
log = logging.getLogger("launch.data")
# Bump when tokenization changes: cache entries written by older code must not be reused.
# v5: parts of memory-mapped arrays (ids, supervised mask, offsets) instead of an Arrow dataset; v6: answer counts
TOKENIZATION_VERSION = "v6"
# A token covers at most this many characters in practice: text beyond max_length x this is never needed.
CHARS_PER_TOKEN_BOUND = 32
# The data settings that decide an entry's content (the split, packing and memory do not).
TOKENIZATION_FIELDS = ("format", "instruction_field", "input_field", "output_field", "messages_field", "text_field",
                       "max_length", "overlong")  # fmt: skip
FIRST_BATCH_ROWS, MAX_BATCH_ROWS = 64, 1000


def resolve_path(data: DataConfig, split: str) -> str | None:
    """The file or Hub id for `split` ("train" or "eval")."""
    if data.path == "bundled" and (split == "train" or data.eval_path in (None, "bundled")):
        return str(bundled_path(data.format, split))
    return data.path if split == "train" else data.eval_path


def build_data(data: DataConfig, backbone: LLMBackbone, seed: int, with_eval: bool = True,
               should_stop: Callable[[], bool] = lambda: False
               ) -> tuple[TokenizedData, dict[str, TokenizedData]]:  # fmt: skip
    """(training data, eval data by source name). One `--data.path`: its train split, and its eval split under the
    name "" if it has one. `data.sources`: each source through stages 1-6 (its eval data too, if it names some), then
    the mixture (stage 7). `with_eval=False` (no evaluation in this run) builds no eval data."""
    if not data.sources:
        train = build_tokenized(data, backbone, "train", should_stop=should_stop)
        evals = {}
        if with_eval and (data.eval_path is not None or data.path == "bundled"):
            evals[""] = build_tokenized(data, backbone, "eval", packing=False, should_stop=should_stop)
        return train, evals
    sources, evals = [], {}
    for i, source in enumerate(data.sources):
        own, name, flag = source_data(data, source), source_name(source), f"data.sources[{i}].path"
        train = build_tokenized(own, backbone, "train", should_stop=should_stop, flag=flag)
        sources.append((name, train, source.weight, source.epochs))
        if with_eval and source.eval_path is not None:
            evals[name] = build_tokenized(own, backbone, "eval", packing=False, should_stop=should_stop,
                                          flag=f"data.sources[{i}].eval_path")  # fmt: skip
    return mix(sources, seed), evals


def build_tokenized(data: DataConfig, backbone: LLMBackbone, split: str, packing: bool | None = None,
                    should_stop: Callable[[], bool] = lambda: False,
                    flag: str | None = None) -> TokenizedData:  # fmt: skip
    """Stages 1-6 for `split`: read the source, tokenize it into the cache (once per node: the first process to take
    the entry's lock builds it, the others wait, then read it), apply `data.overlong`, and pack when asked."""
    path = resolve_path(data, split)
    flag = flag or ("--data.path" if split == "train" else "--data.eval_path")
    if path is None:
        raise DataError(f"no {split} data: give {flag}")
    source = open_source(path, data.split if split == "train" else data.eval_split, flag)  # 1
    tokenizer = backbone.tokenizer
    settings = {k: getattr(data, k) for k in TOKENIZATION_FIELDS}
    builder = backbone.prompt_builder_fn  # a PromptBuilder class, made per part by the process that builds it
    parts = [TOKENIZATION_VERSION, source.digest, backbone.identifier, getattr(builder, "__qualname__", repr(builder)),
             tokenizer.backend_tokenizer.to_str(), json.dumps(settings, sort_keys=True)]  # fmt: skip
    key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]
    entry = cache_root() / "tokenized" / key
    with file_lock(entry.parent / f".{key}.lock"):
        from_cache = (entry / MANIFEST).is_file()
        if not from_cache:
            build_entry(source, entry, data, lambda: builder(backbone.identifier), tokenizer, should_stop)
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


def build_entry(source: Source, entry: Path, data: DataConfig, make_builder: Callable, tokenizer,
                should_stop: Callable[[], bool]) -> dict:  # fmt: skip
    """Stages 1-5 for every part `entry` lacks (inline or in forked workers), then the entry's manifest. Raises
    TokenizingStopped, keeping the finished parts, when `should_stop()` turns true."""
    entry.mkdir(parents=True, exist_ok=True)
    done = {p.index for p in source.parts if (entry / PART.format(p.index)).is_dir()}  # built before a stop
    pending = [p.index for p in source.parts if p.index not in done]
    if done:
        log.info("tokenizing %s: resuming, %d of %d parts already built", source.name, len(done), len(source.parts))
    progress = BuildProgress(source.name, [p.size for p in source.parts], source.unit, done)
    build = lambda index: tokenize_part(source.parts[index], entry, data, make_builder, tokenizer)  # noqa: E731
    run_parts(build, pending, progress, should_stop)
    progress.close()
    return write_manifest(entry, len(source.parts))


def tokenize_part(part: Part, entry: Path, data: DataConfig, make_builder: Callable, tokenizer) -> dict:
    """One part through stages 1-5, a batch of rows at a time: rows (1) -> conversations (2) -> prompts (3) -> ids
    and labels (4) -> the part's arrays (5). A batch holds up to MAX_BATCH_ROWS rows, fewer when rows are long: its
    size follows the most characters per row seen, to stay within --data.tokenize_memory_mb. Overlong examples are
    flagged (cut to max_length in the cache) or, with --data.overlong drop, left out. Returns the part's counts."""
    max_chars, budget = CHARS_PER_TOKEN_BOUND * data.max_length, batch_chars(data.tokenize_memory_mb)
    rows, size, per_row, builder, writer = part.rows(), FIRST_BATCH_ROWS, 1, None, None
    try:
        while batch := list(islice(rows, size)):  # 1
            conversations = [row_to_conversation(row, data, place) for row, place in batch]  # 2
            builder = builder or make_builder()
            prompts = [builder.build_text(c.text) if c.text is not None else builder.build(c.turns, system=c.system)
                       for c in conversations]  # 3  # fmt: skip
            encoded = encode_prompts(prompts, tokenizer, max_chars)  # 4
            chars = [sum(len(chunk.text) for chunk in prompt.chunks) for prompt in prompts]
            kept = []
            for (ids, labels), n in zip(encoded, chars):
                long = len(ids) > data.max_length or n > max_chars
                if not (long and data.overlong == "drop"):
                    kept.append((ids, labels, long))
            answers = [answer for c in conversations for _, answer in c.turns]
            writer = writer or PartWriter(entry, part.index, data.max_length)
            writer.append(kept, len(batch), {"answers": len(answers), "empty_answers": sum(not a.strip() for a in
                                                                                         answers)})  # 5  # fmt: skip
            per_row = max(per_row, sum(chars) // len(batch) + 1)
            size = max(1, min(MAX_BATCH_ROWS, budget // per_row))
        writer = writer or PartWriter(entry, part.index, data.max_length)  # a part with no rows
        return writer.finish()
    finally:
        if writer is not None:
            writer.close()
