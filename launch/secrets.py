"""The one place secrets are known and masked: the Hub token (HF_TOKEN, or the file --model.hf_token_file names) is
replaced by `***` wherever it occurs, inside a path or any other value too, in every file a run writes (config.yaml,
run.json, summary.json, metrics.jsonl, loss.png's labels, the Hugging Face directories, wandb's config and run name)
and in every log line or one-line refusal."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

MASK = "***"
MIN_LENGTH = 8  # shorter "secrets" (a stray `1` in a token file) would mask ordinary text
_registered: set[str] = set()


def register_token_file(path: str | None) -> None:
    """Also mask the token a --model.hf_token_file holds (read once; a missing file is the backbone's error)."""
    if path:
        file = Path(path).expanduser()
        if file.is_file():
            value = file.read_text().strip()
            if len(value) >= MIN_LENGTH:
                _registered.add(value)


def secrets() -> list[str]:
    values = set(_registered)
    env = os.environ.get("HF_TOKEN", "").strip()
    if len(env) >= MIN_LENGTH:
        values.add(env)
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    for secret in secrets():
        text = text.replace(secret, MASK)
    return text


def redact_tree(value: Any) -> Any:
    """A copy of a config-like tree (dicts, lists, strings) with every secret masked."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_tree(k): redact_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_tree(v) for v in value)
    return value


TEXT_SUFFIXES = (".json", ".jinja", ".txt", ".yaml", ".yml", ".md")


def scrub_directory(directory: Path) -> None:
    """Mask secrets in the text files a library wrote into `directory` (transformers records a model's local path
    as `_name_or_path`, peft the base model's as `base_model_name_or_path`)."""
    values = secrets()
    if not values:
        return
    for path in Path(directory).rglob("*"):
        if path.is_file() and path.suffix in TEXT_SUFFIXES and path.stat().st_size < 64 * 2**20:
            text = path.read_text(errors="surrogateescape")
            if any(secret in text for secret in values):
                path.write_text(redact(text), errors="surrogateescape")


def mask_secrets_in_log_records() -> None:
    """Mask secrets in every log record as it is made, whichever logger and handler take it (a handler filter would
    miss the handlers libraries add, such as wandb's debug.log). Installed once per process."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "masks_secrets", False):
        return

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if secrets():
            message = record.getMessage()
            masked = redact(message)
            if masked != message:
                record.msg, record.args = masked, None
        return record

    factory.masks_secrets = True
    logging.setLogRecordFactory(factory)
