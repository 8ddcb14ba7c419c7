"""The run directory contract: refuse to clobber a finished run, clear it only on --run.overwrite, and write the
resolved config (secrets are never config fields)."""

from __future__ import annotations

import shutil
from pathlib import Path

RUN_ARTIFACTS = ("final", "checkpoints", "metrics.jsonl", "config.yaml", ".wandb_id", "preempted")


class RunDirError(ValueError):
    pass


def check_run_dir(output_dir: str, overwrite: bool) -> None:
    """Read-only check, safe on every rank before any process group exists."""
    final = Path(output_dir) / "final"
    if final.exists() and not overwrite:
        raise RunDirError(
            f"--run.output_dir={output_dir} holds a finished run ({final} exists); choose a new "
            "--run.output_dir, or pass --run.overwrite true to replace it"
        )


def prepare_run_dir(output_dir: str, overwrite: bool, config_yaml: str) -> Path:
    """Rank 0 only: with overwrite and a finished run present, remove that run's artifacts (and nothing else); an
    unfinished run is left for auto-resume, so a requeued job launched with --run.overwrite never wipes its own
    checkpoints. Writes config.yaml."""
    run_dir = Path(output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if overwrite and (run_dir / "final").exists():
        for name in RUN_ARTIFACTS:
            path = run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    (run_dir / "config.yaml").write_text(config_yaml)
    (run_dir / "preempted").unlink(missing_ok=True)  # this start is the continuation the marker asked for
    return run_dir
