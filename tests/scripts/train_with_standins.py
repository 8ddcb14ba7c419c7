"""Test driver (torchrun or plain python): the inspect driver (train_and_inspect.py, with its --variants) with both
flash kernels replaced by their exact torch stand-ins (tests/standins.py), so the padding-free paths train on CPU
exactly as they dispatch on a GPU."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import standins  # noqa: E402

if __name__ == "__main__":
    standins.install_all("flash_attention_2")
    standins.install_all("torch_varlen")
    import train_and_inspect

    train_and_inspect.main()
