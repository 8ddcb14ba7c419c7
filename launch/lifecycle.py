"""How a worker ends: exit statuses, and dying with the launcher that started it.

torchrun (2.13) starts each worker in a session of its own, so killing the agent's process group does not reach them,
and a SIGKILLed agent cannot forward anything: its workers would train on under PID 1 and keep writing the run
directory. A worker that an agent started therefore watches its parent and exits when it changes. A plain
`python -m launch.train` (nohup, setsid) has no agent and is never watched.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time

log = logging.getLogger(__name__)
EXIT_OK = 0
EXIT_FAILED = 1  # an error during the run (a stalled collective, a full disk, ...): the message says which
EXIT_BAD_INPUT = 2  # refused before anything was written
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint saved on SIGUSR1/SIGTERM; the batch script requeues
EXIT_INTERRUPTED = 130  # 128 + SIGINT: checkpoint saved on Ctrl-C; run the same command again to continue
EXIT_ORPHANED = 143  # the launcher died: stop without writing anything more


def tell_the_launcher(message: str) -> None:
    """Under torchrun, put the one-line reason into the worker's error file: torchrun's failure summary then shows
    it as the root cause instead of a pointer to its docs (the summary itself, and torchrun's exit status 1, are
    torchrun's own)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            with open(path, "w") as f:
                # torchelastic's own layout: its summary prints py_callstack as the "traceback" line
                info = {"py_callstack": message, "timestamp": str(int(time.time()))}
                json.dump({"message": {"message": message, "extraInfo": info}}, f)
        except OSError:
            pass


def started_by_an_agent() -> bool:
    """torchrun (and `accelerate launch`, which runs torchrun's agent) set TORCHELASTIC_RUN_ID for their workers."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def watch_launcher(interval_s: float = 1.0) -> threading.Thread | None:
    """Exit this worker within ~interval_s of its launcher's death (it is re-parented: getppid() changes)."""
    if not started_by_an_agent():
        return None
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        print(f"shardtune: the launcher (PID {parent}) is gone; worker {os.getpid()} stops without writing anything "
              "more; re-run the same command to resume", file=sys.stderr, flush=True)  # fmt: skip
        os._exit(EXIT_ORPHANED)  # immediately: no cleanup that could write, no waiting on peers

    thread = threading.Thread(target=watch, name="shardtune-launcher-watch", daemon=True)
    thread.start()
    return thread
