"""The one owner of checkpoints: when to save, how to save and publish, which checkpoint to resume, the initial load
when there is none, and reading a checkpoint offline for export.

A checkpoint is complete or invisible: every rank writes into `checkpoints/.step-000040.tmp/` with
torch.distributed.checkpoint (DCP); when all are done, rank 0 writes `shardtune.json` (what the checkpoint is), renames
the directory to `step-000040` and only then updates `latest`. Resume looks only at `step-*` directories with a readable
`shardtune.json` and DCP `.metadata`, so a save killed part-way is never picked. DCP reshards on load, so the world
size may change. The training loop asks two questions: `save(step, ...)` ("save now?" is decided here) and `load`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
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

from fsdp.dist import barrier, broadcast_object, is_rank0
from fsdp.export import TensorSource
from fsdp.materialize import load_from_rank0

log = logging.getLogger(__name__)
META_FILE = "shardtune.json"
MODEL, OPTIM = "model", "optim"  # the top-level keys of a checkpoint's DCP state
STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot or must not be resumed: says which and why."""


@dataclass(frozen=True)
class SavePolicy:
    every_steps: int = 0  # 0: only on request (preemption)
    keep_last: int = 2
    async_save: bool = False


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    """The metadata of a complete checkpoint; raises CheckpointError when incomplete or unreadable."""
    try:
        meta = json.loads((path / META_FILE).read_text())
        dcp.FileSystemReader(str(path)).read_metadata()
    except (OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path} is incomplete or unreadable ({error})") from None
    return meta


def list_checkpoints(root: Path) -> list[Path]:
    """`step-*` directories under `root`, newest first (complete or not)."""
    if not root.is_dir():
        return []
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir())
    return [path for _, path in reversed(steps)]


def find_latest_checkpoint(root: Path) -> Path | None:
    """Newest complete checkpoint under `root`; incomplete or unreadable ones are skipped with a warning."""
    for path in list_checkpoints(root):
        try:
            read_checkpoint_meta(path)
            return path
        except CheckpointError as error:
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


class CheckpointManager:
    """Saves and loads (model, optimizer, trainer state) for every rank under `root`.

    `identity` is recorded in every checkpoint; the keys of `must_match` (identity key -> the flag that sets it) must
    equal the checkpoint's for a resume, and a mismatch is refused by name. `hf_extras(directory)` writes a Hugging Face
    config and tokenizer into each checkpoint, so that it exports on its own.
    """

    def __init__(
        self,
        root: Path,
        policy: SavePolicy,
        identity: dict[str, Any],
        device: torch.device,
        must_match: dict[str, str] | None = None,
        hf_extras: Callable[[Path], None] | None = None,
    ) -> None:
        self.root, self.policy, self.identity, self.device = root, policy, identity, device
        self.must_match = must_match or {}
        self.hf_extras = hf_extras
        self.pending: PendingSave | None = None
        self._async_group = None

    # ---- which checkpoint: needs no process group, so a bad resume is refused before one starts ----
    def select(self, resume: str) -> Path | None:
        """`resume`: auto (the newest complete checkpoint under root, if any), never, or a checkpoint directory."""
        if resume == "never":
            return None
        if resume == "auto":
            path = find_latest_checkpoint(self.root)
        else:
            path = Path(resume)
            try:
                read_checkpoint_meta(path)
            except CheckpointError as error:
                raise CheckpointError(
                    f"--run.resume={resume}: {error}; give a complete checkpoint directory "
                    "(checkpoints/step-NNNNNN), auto or never"
                ) from None
        if path is None:
            return None
        meta = read_checkpoint_meta(path)
        mismatched = [
            f"{key} '{meta.get(key)}' (checkpoint) vs '{self.identity[key]}' ({flag})"
            for key, flag in self.must_match.items()
            if meta.get(key) != self.identity[key]
        ]
        if mismatched:
            raise CheckpointError(
                f"cannot resume from {path}: " + "; ".join(mismatched) + ". Use a new "
                "--run.output_dir, or --run.resume never to start from the pretrained weights"
            )
        if meta.get("config_digest") != self.identity.get("config_digest"):
            log.warning(
                "resuming %s with a changed configuration (model/data/train/fsdp differ from the saved run)", path
            )
        log.info("resuming from %s (step %d, saved by %d ranks)", path, meta["step"], meta["world_size"])
        return path

    # ---- load: resume, or the initial load ----
    def load(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        resume_from: Path | None,
        read_pretrained: Callable[[], Callable[[str], torch.Tensor]],
    ) -> dict[str, Any] | None:
        """Collective. Rank 0's choice of checkpoint is used by every rank. With a checkpoint: model and optimizer
        shards (resharded to this world size), this rank's RNG state, and the trainer state it returns. Without one:
        the pretrained weights, read on rank 0 only (`read_pretrained()` gives `read(name)`) and broadcast; None."""
        chosen = broadcast_object(str(resume_from) if resume_from is not None else None)
        if chosen is None:
            load_from_rank0(model, read_pretrained() if is_rank0() else None, self.device)
            return None
        path = Path(chosen)
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {MODEL: model_state, OPTIM: optim_state}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state[MODEL], optim_state_dict=state[OPTIM])
        own = path / f"rank-{_rank():05d}.pt"
        extra = torch.load(own if own.exists() else path / "rank-00000.pt", weights_only=False)
        if own.exists():
            restore_rng(extra["rng"], self.device)
        return extra["trainer"]

    # ---- save ----
    def due(self, step: int, last_step: bool) -> bool:
        every = self.policy.every_steps
        return bool(every) and (step % every == 0 or last_step)

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        trainer_state: dict[str, Any],
        last_step: bool = False,
        force: bool = False,
    ) -> bool:
        """Collective. Saves when the policy says so (or `force`); returns whether it did. `trainer_state` must be
        the same on every rank; RNG state is saved per rank."""
        if not (force or self.due(step, last_step)):
            return False
        self.finish()
        final_dir = self.root / checkpoint_name(step)
        tmp_dir = self.root / f".{final_dir.name}.tmp"
        if is_rank0():
            shutil.rmtree(tmp_dir, ignore_errors=True)
            tmp_dir.mkdir(parents=True)
            if self.hf_extras is not None:
                self.hf_extras(tmp_dir / "hf")  # config + tokenizer: makes `launch.export` self-contained
        barrier()
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {MODEL: model_state, OPTIM: optim_state}
        torch.save({"trainer": trainer_state, "rng": capture_rng(self.device)}, tmp_dir / f"rank-{_rank():05d}.pt")
        future = None
        if self.policy.async_save:
            future = dcp.async_save(state, checkpoint_id=str(tmp_dir), process_group=self._async_process_group())
        else:
            dcp.save(state, checkpoint_id=str(tmp_dir))
        self.pending = PendingSave(future, tmp_dir, final_dir, {**self.identity, "step": step})
        if not self.policy.async_save:
            self.finish()
        return True

    def _async_process_group(self):
        # Async writes run collectives from a background thread: give them their own group so they never interleave
        # with the training loop's collectives on the default group.
        if self._async_group is None and dist.is_initialized():
            self._async_group = dist.new_group(backend="gloo")
        return self._async_group

    def finish(self) -> None:
        """Wait for a pending (async) save on every rank, then publish it: metadata, rename, `latest`, pruning."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        if pending.future is not None:
            pending.future.result()
        barrier()
        if is_rank0():
            (pending.tmp_dir / META_FILE).write_text(json.dumps(pending.meta, indent=2, sort_keys=True) + "\n")
            if pending.final_dir.exists():  # a re-save of the same step (resumed run): replace it whole
                shutil.rmtree(pending.final_dir)
            os.rename(pending.tmp_dir, pending.final_dir)
            latest_tmp = self.root / ".latest.tmp"
            latest_tmp.write_text(pending.final_dir.name + "\n")
            os.replace(latest_tmp, self.root / "latest")
            self.prune()
            log.info("checkpoint saved: %s", pending.final_dir)
        barrier()

    def prune(self) -> None:
        """Keep the newest `keep_last` complete checkpoints."""
        complete = []
        for path in list_checkpoints(self.root):
            try:
                read_checkpoint_meta(path)
                complete.append(path)
            except CheckpointError:
                continue
        for path in complete[self.policy.keep_last :]:
            shutil.rmtree(path, ignore_errors=True)


def checkpoint_tensor_sources(checkpoint: Path) -> list[TensorSource]:
    """The model tensors of a checkpoint, each read alone when fetched, in one process with no process group (the
    offline export)."""
    read_checkpoint_meta(checkpoint)
    metadata = dcp.FileSystemReader(str(checkpoint)).read_metadata()
    prefix = MODEL + "."

    def fetch(key: str, size: torch.Size, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
        def load() -> torch.Tensor:
            holder = {MODEL: {key: torch.empty(size, dtype=dtype)}}
            dcp.load(holder, checkpoint_id=str(checkpoint), no_dist=True)
            return holder[MODEL][key]

        return load

    return [
        (key[len(prefix) :], md.size, fetch(key[len(prefix) :], md.size, md.properties.dtype))
        for key, md in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and hasattr(md, "size")
    ]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0
