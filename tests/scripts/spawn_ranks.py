"""Test launcher: start N ranks on this host the way torchrun's workers see them (env:// rendezvous: MASTER_ADDR,
MASTER_PORT, RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK), without torchrun's agent.

The agent imports torch before it starts anyone (about 4 s of CPU a launch on this 2-core machine); tests whose
subject is not the launcher use this instead. Like the agent it stops the other ranks when one fails, forwards
SIGINT/SIGTERM/SIGUSR1, and exits with the first failing rank's status. Standard library only, on purpose.

    python tests/scripts/spawn_ranks.py NPROC -m launch.train ARGS...
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    nproc, target = int(sys.argv[1]), sys.argv[2:]
    port = str(free_port())
    ranks = []
    for rank in range(nproc):
        ranks_env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": nproc, "LOCAL_WORLD_SIZE": nproc, "GROUP_RANK": 0}
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        env.update({k: str(v) for k, v in ranks_env.items()})
        ranks.append(subprocess.Popen([sys.executable, *target], env=env))

    def forward(signum, _frame):
        for p in ranks:
            if p.poll() is None:
                p.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, forward)
    status = 0
    while any(p.poll() is None for p in ranks):
        failed = [p.returncode for p in ranks if p.returncode not in (None, 0)]
        if failed and not status:
            status = failed[0]
            time.sleep(5)  # peers that stop on their own (an agreed exit) get the time to; the rest are stopped
            for p in ranks:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.05)
    return status or next((p.returncode for p in ranks if p.returncode), 0)


if __name__ == "__main__":
    sys.exit(main())
