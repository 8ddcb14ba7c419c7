"""Test-only: what the ranks' forkserver imports once (tests/rank_runner.py), so that each forked rank starts warm.

Nothing here starts a thread. Optional packages (matplotlib, peft, datasets, wandb) are imported when installed: the
GPU image lacks some of them, and shardtune imports them only where it uses them.
"""

from __future__ import annotations

import contextlib
import importlib

import torch  # noqa: F401
from transformers import LlamaForCausalLM  # noqa: F401  (the lazy module: load the model code now)

REQUIRED = ["transformers", "draccus", "safetensors.torch", "backbones", "fsdp", "launch.config", "launch.data",
            "launch.trainer", "launch.export", "launch.validate"]  # fmt: skip
OPTIONAL = ["peft", "datasets", "matplotlib.figure", "matplotlib.backends.backend_agg"]

for name in REQUIRED:
    importlib.import_module(name)
for name in OPTIONAL:
    with contextlib.suppress(ImportError):
        importlib.import_module(name)
