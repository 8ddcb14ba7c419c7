"""Export a checkpoint as a Hugging Face directory, streaming one tensor at a time.

    python -m launch.export RUN_DIR|CHECKPOINT OUT [--dtype bf16|fp32] [--max-shard-size-mb 5000] [--overwrite]
    python -m launch.export RUN_DIR OUT --best

RUN_DIR takes the run's newest intact checkpoint, or with --best its best one (--checkpoint.keep_best_by). The dtype
defaults to the one the run exports in (its `export.dtype`). Needs no process group and no GPU; peak memory is one
safetensors shard plus one tensor. The end-of-training `final/` is written by the same `fsdp.export.export_hf`.

OUT is never clobbered by accident: an existing OUT must be empty or an earlier export (which is replaced whole, only
once the new one is complete), unless --overwrite; OUT may not be, contain, or lie inside the source.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from transformers import AutoConfig

from backbones.lora import LoraSettings, adapter_sources, merged_sources
from fsdp.checkpoint import (
    CheckpointError,
    best_checkpoint,
    checkpoint_tensor_sources,
    find_latest_checkpoint,
    read_checkpoint_meta,
)
from fsdp.export import DTYPES, MARKER, ExportError, TensorSource, export_hf
from launch.secrets import scrub_directory


class ExportRefused(ValueError):
    pass


def resolve_checkpoint(source: Path) -> Path:
    """A checkpoint directory as given, or a run directory's newest intact checkpoint."""
    if (source / "checkpoints").is_dir():
        latest = find_latest_checkpoint(source / "checkpoints")
        if latest is None:
            raise ExportRefused(f"{source} is a run directory without an intact checkpoint to export")
        return latest
    if not source.is_dir():
        raise ExportRefused(f"{source}: no such checkpoint or run directory")
    return source


def resolve_best(run_dir: Path) -> Path:
    """A run directory's best checkpoint by the metric the run kept it by (--checkpoint.keep_best_by)."""
    from launch.validate import BEST_BY

    latest = find_latest_checkpoint(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else None
    if latest is None:
        raise ExportRefused(f"--best: {run_dir} is not a run directory with an intact checkpoint")
    metric = read_checkpoint_meta(latest).get("keep_best_by")
    if metric not in BEST_BY:
        raise ExportRefused(f"--best: {run_dir} was not run with --checkpoint.keep_best_by (eval_loss, gen_exact_match "
                            "or gen_contains); export its newest checkpoint without --best")  # fmt: skip
    best = best_checkpoint(run_dir / "checkpoints", metric, BEST_BY[metric] == "lowest")
    if best is None:
        raise ExportRefused(f"--best: no checkpoint of {run_dir} was saved at an evaluation of {metric} yet")
    return best


def check_destination(out: Path, checkpoint: Path, run_dir: Path, overwrite: bool) -> None:
    out, checkpoint, run_dir = out.resolve(), checkpoint.resolve(), run_dir.resolve()
    for path, inside_too in ((checkpoint, True), (run_dir, False)):  # an export inside the run directory is fine
        if out == path or out in path.parents or (inside_too and path in out.parents):
            relation = "is" if out == path else ("contains" if out in path.parents else "lies inside")
            raise ExportRefused(f"{out} {relation} the source {path}; choose a destination outside it")
    if out.exists() and not out.is_dir():
        raise ExportRefused(f"{out} is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file() and not overwrite:
        raise ExportRefused(f"{out} is not empty and is not an earlier export; choose another destination, or pass "
                            "--overwrite to replace it")  # fmt: skip


def run_dtype(checkpoint: Path) -> str:
    """The dtype the run exports in: its config (`export.dtype`), as saved with the checkpoint."""
    config = json.loads((checkpoint / "hf" / "config.json").read_text())
    return "fp32" if config.get("dtype", config.get("torch_dtype")) == "float32" else "bf16"


def export_model(sources: list[TensorSource], out_dir: Path, dtype: str, max_shard_mb: int, write: bool,
                 save_extras: Callable[[Path], None], lora: LoraSettings | None = None, base_path: str = "",
                 source: str = "") -> None:  # fmt: skip
    """A Hugging Face directory from a model's tensors (live and sharded: every rank calls this; or read offline). For
    a LoRA model: the adapters merged into the weights, and the peft adapter (adapter_config.json +
    adapter_model.safetensors, which `PeftModel.from_pretrained(base, OUT/adapter)` loads) in OUT/adapter."""
    if lora is None:
        export_hf(sources, out_dir, dtype, max_shard_mb, write, save_extras, source)
        return
    adapter = out_dir.parent / f".{out_dir.name}-adapter"

    def adapter_config(directory: Path) -> None:
        config = lora.peft_config()
        config.base_model_name_or_path = base_path
        config.save_pretrained(directory)
        scrub_directory(directory)  # the base's local path may hold a secret

    export_hf(adapter_sources(sources), adapter, dtype, 10**9, write, adapter_config, source, "adapter_model")

    def extras_with_adapter(directory: Path) -> None:
        save_extras(directory)
        shutil.move(adapter, directory / "adapter")

    export_hf(merged_sources(sources, lora), out_dir, dtype, max_shard_mb, write, extras_with_adapter, source)


def export_checkpoint(checkpoint: Path, out_dir: Path, dtype: str | None, max_shard_mb: int) -> str:
    """Returns the dtype written (the run's own unless given)."""
    sources = checkpoint_tensor_sources(checkpoint)  # refuses incomplete, unreadable or damaged checkpoints
    if json.loads((checkpoint / "hf" / "config.json").read_text()).get("tie_word_embeddings"):
        sources = [s for s in sources if s[0] != "lm_head.weight"]  # tied: from_pretrained ties it to the embedding
    dtype = dtype or run_dtype(checkpoint)
    meta = read_checkpoint_meta(checkpoint)
    lora = LoraSettings(**{**meta["lora_settings"], "target_modules": tuple(meta["lora_settings"]["target_modules"])}
                        ) if meta.get("lora_settings") else None  # fmt: skip
    hf_dir = checkpoint / "hf"

    def save_extras(directory: Path) -> None:
        for item in hf_dir.iterdir():
            if item.name != "config.json":
                shutil.copy2(item, directory / item.name)
        config = AutoConfig.from_pretrained(hf_dir)
        config.dtype = "bfloat16" if dtype == "bf16" else "float32"
        config.save_pretrained(directory)

    base = json.loads((hf_dir / "config.json").read_text()).get("_name_or_path", "")
    export_model(sources, out_dir, dtype, max_shard_mb, True, save_extras, lora, base, str(checkpoint))
    return dtype


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a run directory (its newest checkpoint) or a checkpoint directory")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the run's export.dtype")
    parser.add_argument("--max-shard-size-mb", type=int, default=5000)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty destination that is no export")
    parser.add_argument(
        "--best", action="store_true", help="a run directory's best checkpoint (--checkpoint.keep_best_by)"
    )
    args = parser.parse_args(argv)
    if args.max_shard_size_mb < 1:
        print(f"shardtune export: --max-shard-size-mb={args.max_shard_size_mb} would write one file per tensor; use "
              ">= 1 (default 5000)", file=sys.stderr)  # fmt: skip
        return 2
    # DCP warns that it loads in a single process: that is the point here.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    try:
        checkpoint = resolve_best(args.source) if args.best else resolve_checkpoint(args.source)
        run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint
        check_destination(args.out_dir, checkpoint, run_dir, args.overwrite)
        dtype = export_checkpoint(checkpoint, args.out_dir, args.dtype, args.max_shard_size_mb)
    except (CheckpointError, ExportRefused, ExportError, OSError) as error:
        print(f"shardtune export: {error}", file=sys.stderr)
        return 2
    print(f"exported {checkpoint} -> {args.out_dir} ({dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
