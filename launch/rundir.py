"""The run directory contract: one owner at a time, nothing of a finished run destroyed before its replacement has
passed every check and started training, and no leftovers of interrupted writes.

The owner holds an exclusive `flock` on `<output_dir>/.shardtune.lock` for the whole run; the file names the holder
(host, PID, Slurm job, start time). The kernel releases the lock when the holder dies, however it dies, so a dead
holder's lock is simply taken over. On NFS, Linux emulates flock with POSIX byte-range locks through the NFS lock
manager (NFSv4, or v3 with lockd): it works across clients, and a crashed client's lock is released when the server
recovers it. Lustre needs the `flock` mount option; where the filesystem has no locking at all the run warns and goes
on unprotected.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)
LOCK_FILE = ".shardtune.lock"
# What a run writes at its top level: replaced only by --run.overwrite, once the new run is training.
RUN_ARTIFACTS = ("final", "checkpoints", "metrics.jsonl", "config.yaml", "run.json", "summary.json", "loss.png",
                 ".wandb_id", "wandb", "preempted")  # fmt: skip


class RunDirError(ValueError):
    pass


def check_run_dir(output_dir: str, overwrite: bool, resume: str) -> None:
    """Read-only checks, safe on every rank before any process group exists."""
    run_dir = Path(output_dir)
    final = run_dir / "final"
    if final.exists() and not overwrite:
        raise RunDirError(f"--run.output_dir={output_dir} holds a finished run ({final} exists); choose a new "
                          "--run.output_dir, or pass --run.overwrite true to replace it")  # fmt: skip
    checkpoints = run_dir / "checkpoints"
    has_checkpoints = checkpoints.is_dir() and any(p.name.startswith("step-") for p in checkpoints.iterdir())
    if resume == "never" and has_checkpoints and not overwrite:
        raise RunDirError(f"--run.resume=never: --run.output_dir={output_dir} holds checkpoints of an unfinished run "
                          "that a new start would replace; choose a new --run.output_dir, resume it "
                          "(--run.resume auto), or pass --run.overwrite true")  # fmt: skip


class RunDirLock:
    """The exclusive lock that makes one live job the owner of a run directory."""

    def __init__(self, output_dir: str) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; None on success, else the one-line reason (naming the holder)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return (f"--run.output_dir={self.path.parent} is in use by another run ({self.holder()}); wait for it to "
                    "finish or stop it, or choose another --run.output_dir")  # fmt: skip
        except OSError as error:
            if error.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL):
                raise
            log.warning("%s: this filesystem has no file locks (%s); nothing stops a second run from sharing this "
                        "directory", self.path.parent, error.strerror)  # fmt: skip
        os.ftruncate(fd, 0)
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID"),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
        os.write(fd, (json.dumps(holder) + "\n").encode())
        self.fd = fd
        return None

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return "holder unknown"
        job = f", Slurm job {info['job']}" if info.get("job") else ""
        return f"host {info.get('host')}, PID {info.get('pid')}{job}, since {info.get('started')}"

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def clean_leftovers(output_dir: str) -> None:
    """Owner only: remove what interrupted writes left (`.step-N.tmp` saves, export temporaries)."""
    run_dir = Path(output_dir)
    for pattern in ("checkpoints/.step-*.tmp", "checkpoints/.latest.tmp", ".final-*"):
        for path in run_dir.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            log.info("removed %s, left by an interrupted write", path)


# What an earlier start that left no checkpoint wrote: a new start from step 0 keeps them aside, never appends.
RECORDS = ("metrics.jsonl", "loss.png", "summary.json", ".wandb_id")


def set_aside_earlier_records(output_dir: str) -> list[str]:
    """Owner only, on a start from step 0 in a directory an earlier start wrote records into (it stopped before its
    first checkpoint, or every checkpoint it left is damaged): rename them to `<name>.earlier-N<suffix>` (N the first
    free number), so the new run's records start clean and nothing is lost; a new `.wandb_id` starts a new wandb run.
    Returns the new names."""
    run_dir = Path(output_dir)
    present = [name for name in RECORDS if (run_dir / name).exists()]
    if not present:
        return []
    n = 1
    while any((run_dir / earlier_name(name, n)).exists() for name in RECORDS):
        n += 1
    for name in present:
        os.rename(run_dir / name, run_dir / earlier_name(name, n))
    return [earlier_name(name, n) for name in present]


def earlier_name(name: str, n: int) -> str:
    stem, dot, suffix = name.rpartition(".") if not name.startswith(".") else (name, "", "")
    return f"{stem}.earlier-{n}{dot}{suffix}"


def start_run(output_dir: str, replace_finished: bool, config_yaml: str) -> None:
    """Owner only, when training starts: with --run.overwrite, only now remove the finished run it replaces (its
    artifacts, nothing else); write config.yaml; clear the preemption marker this start answers."""
    run_dir = Path(output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if replace_finished:
        for name in RUN_ARTIFACTS:
            path = run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    (run_dir / "config.yaml").write_text(config_yaml)
    (run_dir / "preempted").unlink(missing_ok=True)
