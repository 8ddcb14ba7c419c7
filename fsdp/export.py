"""Streaming Hugging Face export: one full tensor at a time is gathered (or read from a checkpoint), converted and
written into size-limited safetensors shards, so no process ever holds two full copies of the model."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor

# name, global shape, and a function that returns the full tensor (a collective for sharded tensors).
TensorSource = tuple[str, torch.Size, Callable[[], torch.Tensor]]

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def model_tensor_sources(model: nn.Module) -> list[TensorSource]:
    """Persistent tensors of a (possibly FSDP2-sharded) model; every rank must fetch them in the same order."""

    def fetch(t: torch.Tensor) -> Callable[[], torch.Tensor]:
        return lambda: t.full_tensor() if isinstance(t, DTensor) else t

    return [(name, tensor.shape, fetch(tensor)) for name, tensor in model.state_dict().items()]


def plan_shards(sources: list[TensorSource], dtype: torch.dtype, max_shard_bytes: int) -> list[list[TensorSource]]:
    shards, size = [[]], 0
    itemsize = torch.empty((), dtype=dtype).element_size()
    for source in sources:
        nbytes = math.prod(source[1]) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(source)
        size += nbytes
    return shards


def export_hf(
    sources: Iterable[TensorSource],
    out_dir: str | Path,
    dtype: str,
    max_shard_mb: int,
    write: bool,
    save_extras: Callable[[Path], None],
) -> None:
    """Write `out_dir` as a Hugging Face model directory. Every rank calls this (tensors may be gathered); only the
    rank with `write=True` writes. The directory appears complete or not at all (temporary name, then rename)."""
    torch_dtype = DTYPES[dtype]
    shards = plan_shards(list(sources), torch_dtype, max_shard_mb * 1024 * 1024)
    out_dir = Path(out_dir)
    tmp = None
    if write:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    weight_map: dict[str, str] = {}
    total = 0
    for index, shard in enumerate(shards, start=1):
        filename = "model.safetensors" if len(shards) == 1 else f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, _, fetch in shard:
            tensor = fetch()
            if write:
                tensors[name] = tensor.detach().to("cpu", torch_dtype).contiguous()
                weight_map[name] = filename
                total += tensors[name].nbytes
            del tensor
        if write:
            save_file(tensors, tmp / filename, metadata={"format": "pt"})
        del tensors
    if not write:
        return
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    save_extras(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
