"""Sharded, resumable checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is complete or invisible: every rank writes into `checkpoints/.step-000040.tmp/`; when all are done,
rank 0 writes `shardtune.json` (what the checkpoint is), renames the directory to `step-000040` and only then updates
the `latest` pointer. Resume looks only at `step-*` directories that hold a readable `shardtune.json` and DCP
`.metadata`, so a save killed part-way is never picked. DCP reshards on load, so the world size may change.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

log = logging.getLogger(__name__)
META_FILE = "shardtune.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    """The metadata of a complete checkpoint; raises ValueError when incomplete or unreadable."""
    try:
        meta = json.loads((path / META_FILE).read_text())
        dcp.FileSystemReader(str(path)).read_metadata()
    except (OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"{path} is incomplete or unreadable ({error})") from None
    return meta


def find_latest_checkpoint(root: Path) -> Path | None:
    """Newest complete checkpoint under `root`; incomplete or unreadable ones are skipped with a warning."""
    if not root.is_dir():
        return None
    candidates = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir())
    for _, path in reversed(candidates):
        try:
            read_checkpoint_meta(path)
            return path
        except ValueError as error:
            log.warning("skipping checkpoint: %s", error)
    return None


def capture_rng(device: torch.device) -> dict[str, Any]:
    """This rank's generators: Python, NumPy, torch's CPU one, and its own GPU's only (never every visible GPU's:
    a node that shows fewer GPUs could not restore them)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass
class PendingSave:
    future: Future | None
    tmp_dir: Path
    final_dir: Path
    meta: dict[str, Any]


class Checkpointer:
    """Saves and loads (model, optimizer, trainer state) for every rank; keeps the newest `keep_last`."""

    def __init__(self, root: Path, keep_last: int, async_save: bool, device: torch.device) -> None:
        self.root = root
        self.device = device
        self.keep_last = keep_last
        self.async_save = async_save
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.pending: PendingSave | None = None
        # Async writes run collectives from a background thread: give them their own group so they never interleave
        # with the training loop's collectives on the default group.
        self.group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any],
             meta: dict[str, Any], extras_writer=None) -> None:
        """Collective. `trainer_state` must be the same on every rank; RNG state is saved per rank."""
        self.finish()
        final_dir = self.root / checkpoint_name(step)
        tmp_dir = self.root / f".{final_dir.name}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            tmp_dir.mkdir(parents=True)
            if extras_writer is not None:
                extras_writer(tmp_dir / "hf")  # config + tokenizer: makes `launch.export` self-contained
        _barrier()
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        torch.save({"trainer": trainer_state, "rng": capture_rng(self.device)}, tmp_dir / f"rank-{self.rank:05d}.pt")
        future = None
        if self.async_save:
            future = dcp.async_save(state, checkpoint_id=str(tmp_dir), process_group=self.group)
        else:
            dcp.save(state, checkpoint_id=str(tmp_dir))
        self.pending = PendingSave(future, tmp_dir, final_dir, {**meta, "step": step})
        if not self.async_save:
            self.finish()

    def finish(self) -> None:
        """Wait for a pending (async) save on every rank, then publish it: metadata, rename, `latest`, pruning."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        if pending.future is not None:
            pending.future.result()
        _barrier()
        if self.rank == 0:
            (pending.tmp_dir / META_FILE).write_text(json.dumps(pending.meta, indent=2, sort_keys=True) + "\n")
            if pending.final_dir.exists():  # a re-save of the same step (resumed run): replace it whole
                shutil.rmtree(pending.final_dir)
            os.rename(pending.tmp_dir, pending.final_dir)
            latest_tmp = self.root / ".latest.tmp"
            latest_tmp.write_text(pending.final_dir.name + "\n")
            os.replace(latest_tmp, self.root / "latest")
            self.prune()
            log.info("checkpoint saved: %s", pending.final_dir)
        _barrier()

    def prune(self) -> None:
        complete = sorted(int(m.group(1)) for p in self.root.iterdir() if (m := STEP_DIR.match(p.name)))
        for step in complete[: -self.keep_last]:
            shutil.rmtree(self.root / checkpoint_name(step), ignore_errors=True)

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Collective. Loads model + optimizer shards (resharded to this world size); returns the trainer state and
        restores this rank's RNG state when the checkpoint has one for it."""
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        own = path / f"rank-{self.rank:05d}.pt"
        extra = torch.load(own if own.exists() else path / "rank-00000.pt", weights_only=False)
        if own.exists():
            restore_rng(extra["rng"], self.device)
        return extra["trainer"]


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
