"""What a run directory says about the run besides its metrics: `run.json` (where and how it ran: world size, nodes,
devices, the command line, the code's git commit, library versions) and `summary.json` (how it went: losses, steps,
time, tokens, throughput, peak memory per rank, where the checkpoints and the export are), with a closing log block.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from fsdp import DistEnv
from fsdp.checkpoint import read_checkpoint_meta
from launch.plot import read_records
from launch.secrets import redact, redact_tree

log = logging.getLogger("launch.summary")
ROOT = Path(__file__).resolve().parents[1]


def git_state() -> dict:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    return {"commit": commit, "dirty": bool(git("status", "--porcelain")) if commit else None}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import transformers

    try:
        shardtune = version("shardtune")
    except PackageNotFoundError:
        shardtune = None
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "shardtune": shardtune}  # fmt: skip


def device_names(env: DistEnv) -> list[str]:
    if env.device.type == "cuda":
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return [platform.processor() or platform.machine()]


def command_line() -> str:
    """The command as typed: `python -m launch.train ...` for a module run (sys.argv[0] is then the file's path)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    program = ["-m", spec.name] if spec is not None and spec.name else sys.argv[:1]
    return " ".join([Path(sys.executable).name, *program, *sys.argv[1:]])


def write_run_record(run_dir: Path, env: DistEnv) -> None:
    record = {
        "world_size": env.world_size, "nodes": env.num_nodes, "processes_per_node": env.local_world_size,
        "device": env.device.type, "devices": device_names(env), "host": platform.node(),
        "command": command_line(), "cwd": os.getcwd(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "git": git_state(), "versions": versions(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip
    (run_dir / "run.json").write_text(redact(json.dumps(record, indent=2)) + "\n")


def peak_memory_gib(device: torch.device) -> float:
    """This process's peak: CUDA memory allocated on a GPU, resident memory (VmHWM) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def write_summary(run_dir: Path, wall_time_s: float, peak_gib: list[float], checkpoints: list[Path],
                  final_dir: Path, sources: dict[str, dict] | None = None,
                  best: tuple[str, Path | None] | None = None) -> dict:  # fmt: skip
    """summary.json from this run's records in metrics.jsonl; `sources` (a mixture's plan) adds, per source, the
    tokens it got and their share of the input tokens beside the share it was meant to get."""
    steps, evals = read_records(run_dir)
    scored = [r for r in evals if "eval_loss" in r]
    losses = [r["eval_loss"] for r in scored]
    lowest = min(scored, key=lambda r: r["eval_loss"]) if scored else None
    generated = [r for r in evals if "gen_exact_match" in r]
    step_time = sum(r["step_time_s"] for r in steps)
    mfu = [r["mfu"] for r in steps if "mfu" in r]
    summary = {
        "final_eval_loss": losses[-1] if losses else None,
        "best_eval_loss": lowest["eval_loss"] if lowest else None,
        "best_eval_step": lowest["step"] if lowest else None,
        "final_train_loss": steps[-1]["loss"] if steps else None,
        "final_gen_exact_match": generated[-1]["gen_exact_match"] if generated else None,
        "best_gen_exact_match": max(r["gen_exact_match"] for r in generated) if generated else None,
        "steps": steps[-1]["step"] if steps else 0,
        "epochs": steps[-1]["epoch"] if steps else 0.0,
        "wall_time_s": round(wall_time_s, 1),
        "supervised_tokens": sum(r["tokens"] for r in steps),
        "input_tokens": sum(r["input_tokens"] for r in steps),
        "mean_tokens_per_s": sum(r["input_tokens"] for r in steps) / step_time if step_time else None,
        "mean_mfu": sum(mfu) / len(mfu) if mfu else None,
        "peak_memory_gib_per_rank": [round(g, 3) for g in peak_gib],
        "checkpoints": [str(p) for p in checkpoints],
        "final": str(final_dir),
    }
    if best is not None:  # --checkpoint.keep_best_by: (metric, its best checkpoint)
        metric, path = best
        value = read_checkpoint_meta(path)["scores"][metric] if path else None
        summary["best_checkpoint"] = {"by": metric, "path": str(path) if path else None, "value": value}
    if sources:
        total = max(1, summary["input_tokens"])
        summary["sources"] = {}
        for name, plan in sources.items():
            real = sum(r.get(f"input_tokens/{name}", 0) for r in steps)
            summary["sources"][name] = {**plan, "supervised_tokens": sum(r.get(f"tokens/{name}", 0) for r in steps),
                                        "input_tokens": real, "token_share": round(real / total, 6)}  # fmt: skip
    summary = redact_tree(summary)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"  {key:<26} {value}" for key, value in summary.items() if key not in ("checkpoints", "sources")]
    lines += [f"  source {name:<19} {100 * got['token_share']:.1f}% of the tokens (meant: "
              f"{100 * got['target_share']:.1f}%)" for name, got in summary.get("sources", {}).items()]  # fmt: skip
    log.info("run summary (%s):\n%s", run_dir / "summary.json", "\n".join(lines))
    return summary
