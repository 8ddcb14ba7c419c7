"""Streaming Hugging Face export: one full tensor at a time is gathered (or read from a checkpoint), converted and
written into size-limited safetensors shards, so no process ever holds two full copies of the model."""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor

from fsdp.dist import all_gather_object

# name, global shape, and a function that returns the full tensor (a collective for sharded tensors).
TensorSource = tuple[str, torch.Size, Callable[[], torch.Tensor]]

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def model_tensor_sources(model: nn.Module) -> list[TensorSource]:
    """Persistent tensors of a (possibly FSDP2-sharded) model; every rank must fetch them in the same order. A tied
    parameter appears once, under its first name (`model.embed_tokens.weight`): a tied Hugging Face checkpoint has
    no `lm_head.weight`, and `from_pretrained` ties it back."""
    from fsdp.materialize import shared_parameters

    aliases = {name for group in shared_parameters(model) for name in group[1:]}

    def fetch(t: torch.Tensor) -> Callable[[], torch.Tensor]:
        return lambda: t.full_tensor() if isinstance(t, DTensor) else t

    return [(name, tensor.shape, fetch(tensor)) for name, tensor in model.state_dict().items() if name not in aliases]


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


MARKER = "shardtune-export.json"  # in every export: what it was made from, so a re-export may replace it


class ExportError(OSError):
    """An export that could not be written (e.g. a full disk); the destination is left as it was."""


def export_hf(
    sources: Iterable[TensorSource],
    out_dir: str | Path,
    dtype: str,
    max_shard_mb: int,
    write: bool,
    save_extras: Callable[[Path], None],
    source: str = "",
    weights_name: str = "model",
) -> None:
    """Write `out_dir` as a Hugging Face model directory. Every rank calls this (tensors may be gathered); only the
    rank with `write=True` writes. The directory appears complete or not at all: it is written under a temporary name
    and renamed; an earlier export there is swapped out only then. Files get the modes the umask allows (safetensors
    would write 0600). A failed write removes the temporary directory and raises ExportError on every rank."""
    torch_dtype = DTYPES[dtype]
    shards = plan_shards(list(sources), torch_dtype, max_shard_mb * 1024 * 1024)
    out_dir = Path(out_dir)
    tmp, error = None, None
    if write:
        try:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            tmp = out_dir.parent / f".{out_dir.name}-{secrets.token_hex(4)}"
            tmp.mkdir()  # not mkdtemp: that is 0700 whatever the umask
        except OSError as caught:
            error, write = caught, False
    weight_map: dict[str, str] = {}
    total = 0
    for index, shard in enumerate(shards, start=1):
        filename = (f"{weights_name}.safetensors" if len(shards) == 1
                    else f"{weights_name}-{index:05d}-of-{len(shards):05d}.safetensors")  # fmt: skip
        tensors = {}
        for name, _, fetch in shard:
            tensor = fetch()  # every rank, in the same order: the gathers are collectives
            if write:
                tensors[name] = tensor.detach().to("cpu", torch_dtype).contiguous()
                weight_map[name] = filename
                total += tensors[name].nbytes
            del tensor
        if write:
            try:
                save_file(tensors, tmp / filename, metadata={"format": "pt"})
            except Exception as caught:  # keep fetching with the others; fail together at the end
                error, write = caught, False
        del tensors
    if write:
        try:
            if len(shards) > 1:
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                (tmp / f"{weights_name}.safetensors.index.json").write_text(
                    json.dumps(index, indent=2, sort_keys=True) + "\n"
                )
            save_extras(tmp)
            (tmp / MARKER).write_text(json.dumps({"source": source, "dtype": dtype}, indent=2) + "\n")
            apply_umask(tmp)
            publish(tmp, out_dir)
        except Exception as caught:
            error = caught
    if tmp is not None and tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    failures = [e for e in all_gather_object(None if error is None else str(error)) if e]
    if failures:
        raise ExportError(f"exporting {out_dir} failed: {failures[0].strip().splitlines()[0]}; nothing there changed")


def publish(tmp: Path, out_dir: Path) -> None:
    """Rename `tmp` to `out_dir`, an earlier export there moved aside first and removed only after."""
    old = out_dir.parent / f".{out_dir.name}-old-{secrets.token_hex(4)}" if out_dir.exists() else None
    if old is not None:
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def current_umask() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    mask = os.umask(0o022)  # no /proc: read it by setting it (and back at once)
    os.umask(mask)
    return mask


def apply_umask(directory: Path) -> None:
    """Directories 0777 and files 0666, less the umask: readable by whoever the umask allows (teammates, servers)."""
    mask = current_umask()
    directory.chmod(0o777 & ~mask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
