"""Pretrained weights read one tensor at a time from a Hugging Face directory's safetensors files.

Plain reads into a fresh tensor, not a memory map: the reader holds one tensor at a time (the file's page cache is the
kernel's, not the process's), so rank 0 never holds a second copy of the model while it broadcasts the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class WeightsError(ValueError):
    """Missing, truncated or malformed weight files: names the file."""


class SafetensorsReader:
    """name -> tensor for every tensor of the `*.safetensors` files in `directory` (those of the index when present)."""

    def __init__(self, directory: Path) -> None:
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            files = sorted({directory / name for name in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise WeightsError(
                f"{directory}: no *.safetensors weights (shardtune reads safetensors, not .bin files; "
                "convert them with transformers' save_pretrained)"
            )
        self.entries: dict[str, tuple[Path, torch.dtype, list[int], int, int]] = {}
        for path in files:
            self._read_header(path)

    def _read_header(self, path: Path) -> None:
        size = path.stat().st_size if path.exists() else 0
        try:
            with path.open("rb") as f:
                length = int.from_bytes(f.read(8), "little")
                if not 0 < length <= size - 8:
                    raise ValueError(f"header length {length} does not fit a {size}-byte file")
                header = json.loads(f.read(length))
        except (OSError, ValueError) as error:
            raise WeightsError(f"{path}: not a readable safetensors file ({error})") from None
        base = 8 + length
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            if base + end > size:
                raise WeightsError(
                    f"{path}: truncated ({size} bytes, but tensor '{name}' ends at byte {base + end}); "
                    "download or copy the file again"
                )
            self.entries[name] = (path, SAFETENSORS_DTYPES[info["dtype"]], info["shape"], base + start, base + end)

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> torch.Size:
        return torch.Size(self.entries[name][2])

    def read(self, name: str) -> torch.Tensor:
        path, dtype, shape, start, end = self.entries[name]
        tensor = torch.empty(shape, dtype=dtype)
        buffer = tensor.view(-1).view(torch.uint8).numpy() if tensor.numel() else None
        if buffer is not None:
            with path.open("rb") as f:
                f.seek(start)
                if f.readinto(buffer) != end - start:
                    raise WeightsError(f"{path}: truncated while reading '{name}'")
        return tensor
