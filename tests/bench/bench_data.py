"""`make bench-data`: preparing alpaca-style SFT data, the old way and shardtune's, with 2 ranks starting together.

  rows-in-python  the earlier path: every rank reads all rows into Python dicts and tokenizes them one at a time
  arrow-batched   shardtune now: Arrow rows, batched fast-tokenizer calls in `datasets.map` (several processes for
                  large sets), written to Arrow as it goes; one rank builds the cache while the other waits and reads

Per rank: wall time and peak resident memory (VmHWM), plus the peak of the tokenizing worker processes it started.
Targets on a 2-core machine: 1,000,000 rows at <= 4 GB per process, >= 4x faster per row than the old path at 100,000.
Not a test: numbers depend on the machine.

    python tests/bench/bench_data.py [--rows 100000 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "an",
    "were",
    "are",
    "which",
    "this",
    "be",
    "or",
    "has",
    "had",
    "not",
    "but",
    "one",
    "all",
    "new",
    "more",
    "two",
    "first",
    "after",
    "who",
    "they",
    "their",
    "its",
    "also",
    "been",
    "will",
    "into",
    "would",
    "time",
    "year",
    "people",
    "over",
    "state",
    "city",
    "world",
    "school",
    "house",
    "music",
    "water",
    "river",
    "light",
    "number",
    "water",
    "system",
    "story",
    "name",
    "place",
]


def generate(path: Path, rows: int, seed: int = 0) -> Path:
    """Alpaca rows: an instruction of ~12 words, an input a third of the time, an answer of ~40 words."""
    if path.is_file():
        return path
    rng = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for _ in range(rows):
            row = {"instruction": " ".join(rng.choices(WORDS, k=rng.randint(6, 18))),
                   "input": " ".join(rng.choices(WORDS, k=rng.randint(4, 12))) if rng.random() < 0.33 else "",
                   "output": " ".join(rng.choices(WORDS, k=rng.randint(20, 60)))}  # fmt: skip
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path


def encode_prompt_per_chunk(prompt, tokenizer) -> tuple[list[int], list[int]]:
    """The earlier `launch.data.encode_prompt` (commit 8808fa0), verbatim: one tokenizer call per text chunk, every
    token's offsets checked in Python. Kept here so that the baseline stays the path the issue measured."""
    from backbones.prompting import BOS
    from launch.data import IGNORE_INDEX

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


def rows_in_python(path: Path) -> int:
    """The earlier path, kept here as the baseline: Python lists of every row, one tokenizer call per row."""
    import datasets

    from backbones import build_backbone
    from launch.config import DataConfig
    from launch.data.conversation import row_to_conversation

    backbone = build_backbone("llama2-tiny-chat", load_weights=False)
    data = DataConfig(path=str(path), format="alpaca", max_length=512)
    builder = backbone.prompt_builder_fn(backbone.identifier)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = {"input_ids": [], "labels": [], "overlong": []}
    for i, row in enumerate(rows):
        conversation = row_to_conversation(row, data, f"{path}:{i + 1}")
        prompt = builder.build(conversation.turns, system=conversation.system)
        ids, labels = encode_prompt_per_chunk(prompt, backbone.tokenizer)
        records["overlong"].append(len(ids) > data.max_length)
        records["input_ids"].append(ids[: data.max_length])
        records["labels"].append(labels[: data.max_length])
    dataset = datasets.Dataset.from_dict(records)
    dataset.save_to_disk(tempfile.mkdtemp())
    return len(dataset)


def arrow_batched(path: Path) -> int:  # returns the packed rows
    from backbones import build_backbone
    from launch.config import DataConfig
    from launch.data import build_tokenized

    backbone = build_backbone("llama2-tiny-chat", load_weights=False)
    data = build_tokenized(DataConfig(path=str(path), format="alpaca", max_length=512, packing=True), backbone, "train")
    return len(data.dataset)


def peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def worker(mode: str, path: str) -> None:
    start = time.perf_counter()
    rows = (rows_in_python if mode == "rows-in-python" else arrow_batched)(Path(path))
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print("RESULT " + json.dumps({"seconds": time.perf_counter() - start, "peak_mib": peak_mib(),
                                  "children_peak_mib": children, "out_rows": rows}), flush=True)  # fmt: skip


def two_ranks(mode: str, path: Path, home: Path) -> list[dict]:
    env = {**os.environ, "SHARDTUNE_HOME": str(home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    ranks = [subprocess.Popen([sys.executable, __file__, "--worker", mode, str(path)], stdout=subprocess.PIPE,
                              text=True, env=env, cwd=ROOT) for _ in range(2)]  # fmt: skip
    results = []
    for rank in ranks:
        out, _ = rank.communicate()
        line = next(x for x in out.splitlines() if x.startswith("RESULT "))
        results.append(json.loads(line[len("RESULT ") :]))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return 0
    from backbones.tiny import cache_root, ensure_tiny_model

    tiny = ensure_tiny_model()
    data_dir = cache_root() / "bench-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    runs = [("rows-in-python", min(args.rows))] + [("arrow-batched", n) for n in args.rows]
    table = []
    for mode, rows in runs:
        path = generate(data_dir / f"alpaca-{rows}.jsonl", rows)
        with tempfile.TemporaryDirectory() as home:  # a cold tokenization cache, the tiny model shared
            os.symlink(tiny, Path(home) / tiny.name)
            for rank, result in enumerate(two_ranks(mode, path, Path(home))):
                table.append({"mode": mode, "rows": rows, "rank": rank, **result})
                print(json.dumps(table[-1]), flush=True)

    def slowest(mode: str, rows: int) -> float:  # training starts when the last rank has its data
        return max(r["seconds"] for r in table if r["mode"] == mode and r["rows"] == rows)

    old_rate = min(args.rows) / slowest("rows-in-python", min(args.rows))
    print("\n| path | rows | rank | seconds | rows/s | peak RSS (MiB) | tokenizing workers' peak (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['mode']} | {r['rows']:,} | {r['rank']} | {r['seconds']:.1f} | {r['rows'] / r['seconds']:,.0f} | "
              f"{r['peak_mib']:.0f} | {r['children_peak_mib']:.0f} |")  # fmt: skip
    for rows in args.rows:
        speedup = rows / slowest("arrow-batched", rows) / old_rate
        print(
            f"arrow-batched at {rows:,} rows: {speedup:.1f}x the old path's rows/s at {min(args.rows):,} (slowest rank)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
