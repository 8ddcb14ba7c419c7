"""Run output from rank 0 only: console logging (secrets redacted), `metrics.jsonl` (with wall-clock and elapsed
time), optional wandb, the loss plot at every evaluation, and progress on a terminal or in a log file."""

from __future__ import annotations

import datetime
import json
import logging
import os
import secrets
import sys
import time
from pathlib import Path

from tqdm import tqdm

from launch.secrets import mask_secrets_in_log_records, redact, redact_tree


def setup_logging(is_rank0: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    mask_secrets_in_log_records()  # every handler's: ours, and the file wandb logs its run's paths into
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Other ranks stay quiet unless something is wrong.
    root.setLevel(logging.INFO if is_rank0 else logging.WARNING)
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Library progress bars (weight loading) would interleave with the training bar; `datasets`, imported only for
    # Hub datasets, turns its own off there (launch/data/sources.py).
    import transformers

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
        self.started = time.monotonic()
        self.wandb = None
        if enabled and "wandb" in trackers:
            import wandb

            mode, warning = wandb_mode()
            if warning:
                logging.getLogger(__name__).warning(warning)
            self.wandb = wandb.init(
                project=wandb_project,
                dir=str(run_dir),
                config=redact_tree(config),
                name=redact(run_dir.name),
                resume="allow",
                id=_wandb_id(run_dir),
                mode=mode,
                # No command line, program path or code copy in the run's metadata, and none of wandb's own
                # terminal lines (they print the run's path unmasked): any of them may hold a secret.
                settings=wandb.Settings(x_disable_meta=True, save_code=False, disable_code=True, silent=True),
            )
            logging.getLogger(__name__).info("wandb: %s run %s in %s", mode, self.wandb.id, self.wandb.dir)
            self.wandb.define_metric("step")
            self.wandb.define_metric("*", step_metric="step")

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (written after the checkpoint a resume starts from), and any record a
        kill cut short (read_jsonl warns about it)."""
        if not self.enabled or not self.path.exists():
            return
        from launch.plot import read_jsonl

        kept = [line for line, record in read_jsonl(self.path) if record["step"] <= step]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {**record, "time": round(time.time(), 3), "elapsed_s": round(time.monotonic() - self.started, 3)}
        with self.path.open("a") as f:
            f.write(redact(json.dumps(record)) + "\n")
        if self.wandb is not None:
            self.wandb.log(wandb_record(record))
        if "eval_loss" in record or "gen_exact_match" in record:
            self.plot()

    def plot(self) -> None:
        """Redraw `loss.png` (best effort: a plot never stops a run)."""
        from launch.plot import plot_runs

        try:
            plot_runs([self.path.parent], self.path.parent / "loss.png")
        except Exception as error:  # e.g. a read-only or full disk: the metrics themselves were written
            logging.getLogger(__name__).warning("could not draw %s: %s", self.path.parent / "loss.png", error)

    def close(self) -> None:
        if self.enabled:
            self.plot()
        if self.wandb is not None:
            self.wandb.finish()


def wandb_record(record: dict) -> dict:
    """The record as wandb takes it: the generation samples as a table (step, source, prompt, reference,
    generated), as TRL's completions table."""
    samples = record.get("gen_samples")
    if not samples:
        return record
    import wandb

    columns = ["step", "source", "prompt", "reference", "generated"]
    rows = [[record["step"], *(redact(str(sample[c])) for c in columns[1:])] for sample in samples]
    return {**record, "gen_samples": wandb.Table(columns=columns, data=rows)}


def _wandb_id(run_dir: Path) -> str:
    """A stable run id per output directory, so a resumed run continues the same wandb run."""
    id_file = run_dir / ".wandb_id"
    if not id_file.exists():
        id_file.write_text(secrets.token_hex(8))
    return id_file.read_text().strip()


class Progress:
    """Training progress on rank 0: a tqdm bar on a terminal; in a file (Slurm output, CI logs), one log line every
    `every_s` seconds or `every_steps` steps (whichever comes first; 0 turns one off) with step/total, loss, lr,
    tokens/s and ETA, so that `tail -f` shows the run moving."""

    def __init__(self, total: int, initial: int, enabled: bool, every_s: float = 10.0, every_steps: int = 0,
                 interactive: bool | None = None) -> None:  # fmt: skip
        self.total, self.done, self.enabled = total, initial, enabled
        self.every_s, self.every_steps = every_s, every_steps
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.bar = None
        if enabled and self.interactive:
            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=0.1)  # fmt: skip
        self.start = self.last = time.monotonic()
        self.first = initial

    def step(self, record: dict) -> None:
        self.done = record["step"]
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            self.bar.update(1)
            return
        now = time.monotonic()
        due_steps = self.every_steps and (self.done - self.first) % self.every_steps == 0
        if due_steps or (self.every_s and now - self.last >= self.every_s) or self.done == self.total:
            self.last = now
            per_step = (now - self.start) / max(1, self.done - self.first)
            eta = datetime.timedelta(seconds=round(per_step * (self.total - self.done)))
            logging.getLogger("launch.progress").info(
                "step %d/%d | loss %.4f | lr %.3g | %.0f tok/s | ETA %s", self.done, self.total, record["loss"],
                record["lr"], record["tokens_per_s"], eta)  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
