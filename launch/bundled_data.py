"""The bundled, seeded instruction dataset (train and eval splits, alpaca and chat formats): the smoke run's data.

`data.path: bundled` resolves to these files, written once into the cache.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

from backbones.tiny import cache_root
from backbones.tiny_corpus import SYSTEM_PROMPTS, sample_task

BUNDLED_VERSION = "v1"
SPLITS = {"train": (2000, 1), "eval": (64, 2)}  # split -> (examples, seed)


def alpaca_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [dict(zip(("instruction", "input", "output"), sample_task(rng))) for _ in range(n)]


def chat_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for _turn in range(1 if rng.random() < 0.7 else 2):
            instruction, inp, output = sample_task(rng)
            messages.append({"role": "user", "content": f"{instruction} {inp}".strip()})
            messages.append({"role": "assistant", "content": output})
        rows.append({"messages": messages})
    return rows


def bundled_path(data_format: str, split: str, root: Path | None = None) -> Path:
    """Path of the bundled `split` in `data_format` (alpaca or chat), generated on first use (atomically)."""
    if data_format not in ("alpaca", "chat"):
        raise ValueError(f"the bundled data comes in formats alpaca and chat, not '{data_format}' (--data.format)")
    path = (root or cache_root()) / f"data-{BUNDLED_VERSION}" / f"{data_format}-{split}.jsonl"
    if not path.is_file():
        n, seed = SPLITS[split]
        rows = alpaca_rows(n, seed) if data_format == "alpaca" else chat_rows(n, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        os.replace(tmp, path)
    return path


if __name__ == "__main__":
    for fmt in ("alpaca", "chat"):
        for split in SPLITS:
            print(bundled_path(fmt, split))
