"""The one owner of checkpoints: when to save, how to save and publish, which checkpoint to resume, the initial load
when there is none, and reading a checkpoint offline for export.

A checkpoint is complete or invisible: every rank writes into `checkpoints/.step-000040.tmp/` with
torch.distributed.checkpoint (DCP); when all are done, rank 0 writes `shardtune.json` (what the checkpoint is), renames
the directory to `step-000040` and only then updates `latest`. Resume looks only at `step-*` directories with a readable
`shardtune.json` and DCP `.metadata`, so a save killed part-way is never picked. DCP reshards on load, so the world
size may change. The training loop asks two questions: `save(step, ...)` ("save now?" is decided here) and `load`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import random
import re
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from fsdp.dist import all_gather_object, all_reduce_sum, barrier, broadcast_object, collective_timeout, is_rank0
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
    every_steps: int = 0  # 0: not by steps
    every_minutes: float = 0.0  # 0: not by time
    keep_last: int = 2
    async_save: bool = False
    timeout_s: float = 3600.0  # collective timeout while loading and saving
    keep_best_by: str | None = None  # also keep the best checkpoint by this score (see `save`), never pruned
    best_is_lowest: bool = True


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


def checkpoint_damage(path: Path) -> str | None:
    """What is missing or truncated in a checkpoint whose metadata reads, or None when every file DCP's `.metadata`
    and the save's world size call for is there, whole."""
    meta = read_checkpoint_meta(path)
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    needed.update({f"rank-{rank:05d}.pt": 1 for rank in range(int(meta.get("world_size", 1)))})
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size < size:
            return f"{file} is truncated ({file.stat().st_size} of at least {size} bytes)"
    return None


def list_checkpoints(root: Path) -> list[Path]:
    """`step-*` directories under `root`, newest first (complete or not)."""
    if not root.is_dir():
        return []
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir())
    return [path for _, path in reversed(steps)]


def best_checkpoint(root: Path, metric: str, lowest: bool = True) -> Path | None:
    """The complete checkpoint with the best `metric` among those scored with it (the later one on a tie)."""
    best, best_value = None, None
    for path in reversed(list_checkpoints(root)):  # oldest first
        try:
            value = read_checkpoint_meta(path).get("scores", {}).get(metric)
        except CheckpointError:
            continue
        if value is not None and (best_value is None or (value <= best_value if lowest else value >= best_value)):
            best, best_value = path, value
    return best


def find_latest_checkpoint(root: Path) -> Path | None:
    """Newest complete and intact checkpoint under `root`; incomplete, unreadable or damaged ones are skipped with one
    warning each, naming what is wrong."""
    for path in list_checkpoints(root):
        try:
            damage = checkpoint_damage(path)
        except CheckpointError as error:
            log.warning("skipping checkpoint: %s", error)
            continue
        if damage is None:
            return path
        log.warning("skipping damaged checkpoint %s: %s; trying an older one", path.name, damage)
    return None


def capture_rng(device: torch.device) -> dict[str, Any]:
    """This rank's generators as tensors and plain values (loadable with weights_only=True): Python, NumPy, torch's CPU
    one, and its own GPU's only (never every visible GPU's: a node that shows fewer GPUs could not restore them)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },  # fmt: skip
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    python, numpy = state["python"], state["numpy"]
    random.setstate((python["version"], tuple(python["words"].tolist()), python["gauss"]))
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached"]))  # fmt: skip
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def load_rank_state(file: Path) -> dict[str, Any]:
    """A per-rank state file, as plain data only: a file that would run code when unpickled is refused."""
    try:
        return torch.load(file, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{file} holds more than tensors and plain values; refusing to load it (it could run "
            f"code): {str(error).splitlines()[0]}"
        ) from None


@dataclass
class PendingSave:
    future: Future | None
    tmp_dir: Path
    final_dir: Path
    meta: dict[str, Any]
    needed: int  # bytes, for the disk-full message


class PathFreeWriter(dcp.FileSystemWriter):
    """DCP's file writer, but `.metadata` records no directory: DCP would store the temporary path the checkpoint is
    written under (stale once it is published, moved or copied), and a path may hold a secret (launch/secrets.py)."""

    def storage_meta(self):
        meta = super().storage_meta()
        if meta is not None:
            meta.checkpoint_id = None
        return meta


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
        self.last_save_time = time.monotonic()
        self._async_group = None

    # ---- which checkpoint: needs no process group, so a bad resume is refused before one starts ----
    def select(self, resume: str) -> Path | None:
        """`resume`: auto (the newest intact checkpoint under root, if any), never, or a checkpoint directory."""
        if resume == "never":
            return None
        if resume == "auto":
            path = find_latest_checkpoint(self.root)
        else:
            path = Path(resume)
            try:
                damage = checkpoint_damage(path)
            except CheckpointError as error:
                raise CheckpointError(f"--run.resume={resume}: {error}; give a complete checkpoint directory "
                                      "(checkpoints/step-NNNNNN), auto or never") from None  # fmt: skip
            if damage:
                raise CheckpointError(f"--run.resume={resume}: the checkpoint is damaged: {damage}")
        if path is None:
            if resume == "auto" and list_checkpoints(self.root):
                log.warning("no intact checkpoint left in %s: this run starts from the pretrained weights at step 0",
                            self.root)  # fmt: skip
            return None
        meta = read_checkpoint_meta(path)
        mismatched = [f"{key} '{meta.get(key)}' (checkpoint) vs '{self.identity[key]}' ({flag})"
                      for key, flag in self.must_match.items() if meta.get(key) != self.identity[key]]  # fmt: skip
        if mismatched:
            raise CheckpointError(
                f"cannot resume from {path}: " + "; ".join(mismatched) + ". Use a new "
                "--run.output_dir, or --run.resume never to start from the pretrained weights"
            )
        if meta.get("config_digest") != self.identity.get("config_digest"):
            log.warning("resuming %s with a changed configuration (model/data/train/fsdp differ from the saved run)",
                        path)  # fmt: skip
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
        with collective_timeout(self.policy.timeout_s):
            if chosen is None:
                load_from_rank0(model, read_pretrained() if is_rank0() else None, self.device)
                return None
            path = Path(chosen)
            # Plain data only, and read before the collective load: a refused file fails every rank together.
            own, saved_world = path / f"rank-{_rank():05d}.pt", int(read_checkpoint_meta(path)["world_size"])
            error, extra = None, None
            try:
                extra = load_rank_state(own if _rank() < saved_world else path / "rank-00000.pt")
            except (CheckpointError, OSError) as caught:
                error = str(caught)
            errors = [e for e in all_gather_object(error) if e]
            if errors:
                raise CheckpointError(errors[0])
            model_state, optim_state = get_state_dict(model, optimizer)
            state = {MODEL: model_state, OPTIM: optim_state}
            dcp.load(state, checkpoint_id=str(path))
            set_state_dict(model, optimizer, model_state_dict=state[MODEL], optim_state_dict=state[OPTIM])
        if _rank() < saved_world:  # ranks a larger world adds keep their fresh generators
            restore_rng(extra["rng"], self.device)
        self.last_save_time = time.monotonic()
        return extra["trainer"]

    # ---- save ----
    def votes(self) -> list[float]:
        """This rank's part of the step-boundary collective: [a save is due by time (rank 0's clock decides),
        this rank's async write is done (or there is none)]."""
        minutes = self.policy.every_minutes
        due = is_rank0() and bool(minutes) and time.monotonic() - self.last_save_time >= 60 * minutes
        done = self.pending is None or self.pending.future is None or self.pending.future.done()
        return [float(due), float(done)]

    def publish_if_written(self, done_votes: float) -> None:
        """Publish a pending async save as soon as every rank's write is done (`done_votes` summed over ranks)."""
        if self.pending is not None and done_votes >= _world():
            self.finish()

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        trainer_state: dict[str, Any],
        last_step: bool = False,
        force: bool = False,
        scores: dict[str, float] | None = None,
    ) -> bool:
        """Collective. Saves on the policy's steps, at the last step (so that a failed export only needs a re-run), or
        when `force`d (by time, or a signal); returns whether it did. `trainer_state` must be equal on every rank.
        `scores` (evaluation metrics measured at this step) are recorded with it, for keep_best_by."""
        every = self.policy.every_steps
        if not (force or last_step or (every and step % every == 0)):
            return False
        self.finish()
        final_dir = self.root / checkpoint_name(step)
        tmp_dir = self.root / f".{final_dir.name}.tmp"
        with collective_timeout(self.policy.timeout_s):
            model_state, optim_state = get_state_dict(model, optimizer)
            state = {MODEL: model_state, OPTIM: optim_state}
            needed = self._check_space(state, final_dir)
            self._on_every_rank(lambda: self._prepare(tmp_dir), tmp_dir, needed, final_dir)
            self._on_every_rank(
                lambda: torch.save(
                    {"trainer": trainer_state, "rng": capture_rng(self.device)}, tmp_dir / f"rank-{_rank():05d}.pt"
                ),
                tmp_dir,
                needed,
                final_dir,
            )
            future = None
            try:
                if self.policy.async_save:
                    future = dcp.async_save(
                        state, storage_writer=PathFreeWriter(str(tmp_dir)), process_group=self._async_process_group()
                    )
                else:
                    dcp.save(state, storage_writer=PathFreeWriter(str(tmp_dir)))
            except Exception as error:  # DCP raises on every rank when any rank's write failed
                self._fail(tmp_dir, needed, final_dir, error)
        meta = {**self.identity, "step": step, "scores": scores or {}}
        self.pending = PendingSave(future, tmp_dir, final_dir, meta, needed)
        self.last_save_time = time.monotonic()
        if not self.policy.async_save:
            self.finish()
        return True

    def _prepare(self, tmp_dir: Path) -> None:
        if is_rank0():
            shutil.rmtree(tmp_dir, ignore_errors=True)
            tmp_dir.mkdir(parents=True)
            if self.hf_extras is not None:
                self.hf_extras(tmp_dir / "hf")  # config + tokenizer: makes `launch.export` self-contained

    def _check_space(self, state: dict, final_dir: Path) -> int:
        """Refuse a save that cannot fit, before writing a byte: about the bytes of every rank's shards."""
        local = sum(t.to_local().nbytes if hasattr(t, "to_local") else t.nbytes
                    for t in _tensors(state))  # fmt: skip
        (needed,) = all_reduce_sum([float(local)], self.device)
        problem = None
        if is_rank0():
            self.root.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.root).free
            if free < 1.05 * needed:
                problem = self._no_space(final_dir, free, needed)
        problem = broadcast_object(problem)
        if problem:
            raise CheckpointError(problem)
        return int(needed)

    def _no_space(self, final_dir: Path, free: int, needed: float) -> str:
        return (f"no space for checkpoint {final_dir}: {self.root} has {free / 2**20:.0f} MiB free and a checkpoint "
                f"needs about {needed / 2**20:.0f} MiB; free space (or lower --checkpoint.keep_last) and run the same "
                "command again: earlier checkpoints are kept")  # fmt: skip

    def _on_every_rank(self, write: Callable[[], None], tmp_dir: Path, needed: int, final_dir: Path) -> None:
        """Run a local write on every rank; if any rank failed, every rank raises (nobody waits in a collective)."""
        error = None
        try:
            write()
        except Exception as caught:  # OSError, or torch.save's RuntimeError on a full disk
            error = caught
        failures = [e for e in all_gather_object(None if error is None else f"rank {_rank()}: {error}") if e]
        if failures:
            self._fail(tmp_dir, needed, final_dir, error or RuntimeError(failures[0]))

    def _fail(self, tmp_dir: Path, needed: int, final_dir: Path, error: BaseException) -> None:
        """Clean up a failed save (earlier checkpoints stay) and say why, naming a full disk as such."""
        barrier()
        if is_rank0():
            shutil.rmtree(tmp_dir, ignore_errors=True)
        free = shutil.disk_usage(self.root).free if self.root.exists() else 0
        full = getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error) or free < needed
        if full:
            raise CheckpointError(self._no_space(final_dir, free, needed)) from None
        raise CheckpointError(f"saving checkpoint {final_dir} failed: {str(error).strip().splitlines()[0]}; earlier "
                              "checkpoints are kept") from None  # fmt: skip

    def _async_process_group(self):
        # Async writes run collectives from a background thread: give them their own group so they never interleave
        # with the training loop's collectives on the default group.
        if self._async_group is None and dist.is_initialized():
            self._async_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.policy.timeout_s))
        return self._async_group

    def finish(self) -> None:
        """Wait for a pending (async) save on every rank, then publish it: metadata, rename, `latest`, pruning."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        with collective_timeout(self.policy.timeout_s):
            if pending.future is not None:
                error = None
                try:
                    pending.future.result()
                except Exception as caught:
                    error = caught
                if any(all_gather_object(error is not None)):
                    self._fail(
                        pending.tmp_dir, pending.needed, pending.final_dir, error or RuntimeError("a peer failed")
                    )
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
        """Keep the newest `keep_last` complete checkpoints, and the best one by `keep_best_by`."""
        complete = []
        for path in list_checkpoints(self.root):
            try:
                read_checkpoint_meta(path)
                complete.append(path)
            except CheckpointError:
                continue
        best = self.best()
        for path in complete[self.policy.keep_last :]:
            if path != best:
                shutil.rmtree(path, ignore_errors=True)

    def best(self) -> Path | None:
        metric = self.policy.keep_best_by
        return best_checkpoint(self.root, metric, self.policy.best_is_lowest) if metric else None


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for value in tree.values() for t in _tensors(value)]
    if isinstance(tree, (list, tuple)):
        return [t for value in tree for t in _tensors(value)]
    return []


def checkpoint_tensor_sources(checkpoint: Path) -> list[TensorSource]:
    """The model tensors of a checkpoint, each read alone when fetched, in one process with no process group (the
    offline export). Refuses incomplete, unreadable or damaged checkpoints."""
    damage = checkpoint_damage(checkpoint)
    if damage:
        raise CheckpointError(f"{checkpoint} is damaged: {damage}")
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


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1
