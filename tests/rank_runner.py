"""Test-only: start shardtune ranks from a warm interpreter instead of a cold one.

Every `python -m launch.train` spends ~10 s of CPU importing torch, transformers and datasets before it does anything;
on a 2-core machine that is most of a test's wall time. `run_cli` therefore starts its ranks through a
multiprocessing *forkserver*: one server process, started once per test session, imports those libraries
(tests/rank_preload.py, nothing that starts a thread), and forks a fresh child for each rank. On a CUDA machine the
ranks are spawned instead (conftest.ranks_start_method says why) and import what they use themselves. The child
then does what the interpreter does for `python -m launch.train ARGS` or `python SCRIPT ARGS`: it takes the
environment, working directory and argv it was given, redirects stdout/stderr, runs the module or script as
`__main__` (runpy), runs the atexit handlers, and exits with the same status (SystemExit's code, 1 after an uncaught
exception with its traceback on stderr). Ranks get the env:// variables torchrun would set; signals (SIGTERM, SIGINT,
SIGSTOP, SIGKILL) reach them as they would reach a `Popen`. Tests about launchers (torchrun and its agent,
accelerate, Slurm, the smoke run's torchrun) and timed cold starts (`--help`, the planner) still start real
interpreters.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import runpy
import sys
import traceback


def run(target: list[str], args: list[str], env: dict, cwd: str, stdout: str, stderr: str) -> None:
    """The child: become `python TARGET ARGS` and exit as it would. `target` is ["-m", module] or [script]."""
    code = 0
    try:
        out = os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        err = out if stderr == stdout else os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        import torch

        torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
        if target[0] == "-m":
            sys.modules.pop(target[1], None)  # run it fresh as __main__, as `python -m` does
            sys.argv = [target[1], *args]
            runpy.run_module(target[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = [target[0], *args]
            sys.path.insert(0, os.path.dirname(os.path.abspath(target[0])))
            runpy.run_path(target[0], run_name="__main__")
    except SystemExit as exit_:
        if exit_.code is None:
            code = 0
        elif isinstance(exit_.code, int):
            code = exit_.code
        else:
            print(exit_.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001  what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(code)
