"""Convert a sharded checkpoint into a Hugging Face directory, streaming one tensor at a time.

    python -m launch.export runs/x/checkpoints/step-000040 exported/ [--dtype bf16|fp32] [--max-shard-size-mb 5000]

Needs no process group and no GPU. Peak memory is one safetensors shard plus one tensor, never the whole model twice;
the end-of-training `final/` is written by the same `fsdp.export.export_hf`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import warnings
from pathlib import Path

from transformers import AutoConfig

from fsdp.checkpoint import CheckpointError, checkpoint_tensor_sources
from fsdp.export import DTYPES, export_hf


def export_checkpoint(checkpoint: Path, out_dir: Path, dtype: str, max_shard_mb: int) -> None:
    sources = checkpoint_tensor_sources(checkpoint)  # refuses incomplete or unreadable checkpoints
    hf_dir = checkpoint / "hf"

    def save_extras(directory: Path) -> None:
        for item in hf_dir.iterdir():
            if item.name != "config.json":
                shutil.copy2(item, directory / item.name)
        config = AutoConfig.from_pretrained(hf_dir)
        config.dtype = "bfloat16" if dtype == "bf16" else "float32"
        config.save_pretrained(directory)

    export_hf(sources, out_dir, dtype, max_shard_mb, write=True, save_extras=save_extras)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--max-shard-size-mb", type=int, default=5000)
    args = parser.parse_args(argv)
    # DCP warns that it loads in a single process: that is the point here.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    try:
        export_checkpoint(args.checkpoint_dir, args.out_dir, args.dtype, args.max_shard_size_mb)
    except CheckpointError as error:
        print(f"shardtune export: {error}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint_dir} -> {args.out_dir} ({args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
