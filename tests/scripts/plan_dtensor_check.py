"""Test driver: the planner's sharded bytes against FSDP2's DTensors over a fake process group, for LLaMA-2 7B at
8 and 64 ranks and full, grad-op and hybrid sharding (8 GPUs a node), and for Llama 3.1 8B, Llama 3.2 1B (tied) and
Qwen3 0.6B (tied) at 8 ranks. Prints one JSON line per case."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from launch.plan import plan  # noqa: E402

if __name__ == "__main__":
    for world in (8, 64):
        for sharding in ("full", "grad-op", "hybrid"):
            result = plan(
                [
                    "--config",
                    "recipes/llama2-7b-chat-full.yaml",
                    "--gpus-per-node",
                    "8",
                    "--nodes",
                    str(world // 8),
                    "--fsdp.sharding",
                    sharding,
                    "--train.micro_batch_size",
                    str(64 // world),
                ]
            )  # fmt: skip  64 sequences over 64 ranks: 1 each
            print(json.dumps({"world": world, "sharding": sharding, "planned": result["sharded_state_bytes"],
                              "dtensors": result["dtensor_check"]}), flush=True)  # fmt: skip
    for recipe in ("llama3.1-8b-instruct-full", "llama3.2-1b-instruct-full", "qwen3-0.6b-full"):
        result = plan(["--config", f"recipes/{recipe}.yaml", "--gpus-per-node", "8", "--nodes", "1",
                       "--train.micro_batch_size", "1", "--train.global_batch_size", "8"])  # fmt: skip
        print(json.dumps({"world": 8, "sharding": "full", "recipe": recipe, "planned": result["sharded_state_bytes"],
                          "dtensors": result["dtensor_check"]}), flush=True)  # fmt: skip
