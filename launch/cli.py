"""Console scripts: `shardtune-train` (= python -m launch.train), `shardtune-export`, `shardtune-plot`. `--help`
answers before torch is imported."""

from __future__ import annotations

import sys


def train() -> int:
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        from launch.help import print_help

        return print_help()
    from launch.train import main

    return main()


def export() -> int:
    from launch.export import main

    return main()


def plot() -> int:
    from launch.plot import main

    return main()
