"""Test driver (torchrun or plain python): `launch.train` with one flash kernel replaced by its exact torch stand-in
(tests/standins.py), so the padding-free path trains on CPU exactly as it dispatches on a GPU.

    train_with_standins.py flash_attention_2|torch_varlen [launch.train arguments]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import standins  # noqa: E402

if __name__ == "__main__":
    standins.install_all(sys.argv[1])
    from launch.train import main

    sys.exit(main(sys.argv[2:]))
