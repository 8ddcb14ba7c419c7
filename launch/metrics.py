"""Run output from rank 0 only: console logging (secrets redacted), `metrics.jsonl`, optional wandb, progress bar."""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
from pathlib import Path

from tqdm import tqdm


class RedactSecrets(logging.Filter):
    """Replaces the Hub token's value wherever it would reach a log line."""

    def filter(self, record: logging.LogRecord) -> bool:
        token = os.environ.get("HF_TOKEN")
        if token and token in record.getMessage():
            record.msg, record.args = record.getMessage().replace(token, "***"), None
        return True


def setup_logging(is_rank0: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(RedactSecrets())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Other ranks stay quiet unless something is wrong.
    root.setLevel(logging.INFO if is_rank0 else logging.WARNING)
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Library progress bars (dataset saving, weight loading) would interleave with the training bar.
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def wandb_mode() -> tuple[str, str | None]:
    """(mode, warning): online only with credentials (WANDB_API_KEY, or `wandb login`'s netrc entry); otherwise offline,
    with a warning, instead of failing or prompting mid-run. WANDB_MODE=offline/disabled is kept as set."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return mode, None
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if os.environ.get("WANDB_API_KEY") or (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")):
        return "online", None
    return "offline", ("wandb has no credentials (set WANDB_API_KEY or run `wandb login`): logging offline into the "
                       "run's wandb/ directory; `wandb sync` uploads it later")  # fmt: skip


class MetricsWriter:
    """One JSON object per optimizer step / evaluation in `metrics.jsonl`, mirrored to the chosen trackers.

    wandb plots against our own `step` (define_metric) and is never given `step=`: wandb drops records whose internal
    step does not increase, which would silently lose the steps a resumed run logs again after its checkpoint (wandb's
    "rewind" is a private preview). A resumed run continues the same wandb run (the id in `.wandb_id`); re-logged
    steps appear again at their step, the later values last."""

    def __init__(self, run_dir: Path, trackers: list[str], config: dict, enabled: bool, wandb_project: str) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.wandb = None
        if enabled and "wandb" in trackers:
            import wandb

            mode, warning = wandb_mode()
            if warning:
                logging.getLogger(__name__).warning(warning)
            self.wandb = wandb.init(
                project=wandb_project,
                dir=str(run_dir),
                config=config,
                name=run_dir.name,
                resume="allow",
                id=_wandb_id(run_dir),
                mode=mode,
            )
            self.wandb.define_metric("step")
            self.wandb.define_metric("*", step_metric="step")

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (written after the checkpoint a resume starts from)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_id(run_dir: Path) -> str:
    """A stable run id per output directory, so a resumed run continues the same wandb run."""
    id_file = run_dir / ".wandb_id"
    if not id_file.exists():
        id_file.write_text(secrets.token_hex(8))
    return id_file.read_text().strip()


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm:
    """step/total, loss, tokens/s and ETA on rank 0; in a log file (Slurm, CI) one line every 30 s, not per step."""
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
        mininterval=0.1 if interactive else 30.0,
    )
