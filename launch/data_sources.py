"""Reading SFT data (local .jsonl/.json/.parquet, a Hub dataset id, or the bundled set) and checking each row.

Every problem is reported before training, with the file, the line or row, and what was expected.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets

from backbones.hub import hub_unreachable, offline_advice
from backbones.prompting import BOS, EOS, Prompt, PromptBuilder
from launch.bundled_data import bundled_path
from launch.config import DataConfig, looks_local


class DataError(ValueError):
    """Bad training data: names the file, the line or row, and what was expected."""


def resolve_path(data: DataConfig, split: str) -> str | None:
    """The file or Hub id for `split` ("train" or "eval")."""
    if data.path == "bundled" and (split == "train" or data.eval_path in (None, "bundled")):
        return str(bundled_path(data.format, split))
    return data.path if split == "train" else data.eval_path


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def load_rows(source: str, hub_split: str) -> tuple[datasets.Dataset, str, Callable[[int], str]]:
    """The rows as an Arrow table (memory-mapped, never Python lists), a digest of the source's content (the
    tokenization cache key), and where(i): how an error names row i (`file:line` for JSON lines)."""
    path = Path(source).expanduser()
    if path.is_dir():  # a dataset directory (as a Hub repo would be downloaded): the same `datasets` path
        return load_hub_dataset(str(path), hub_split)
    if not (path.suffix in (".jsonl", ".json", ".parquet") or looks_local(source)):
        return load_hub_dataset(source, hub_split)
    if not path.is_file():
        raise DataError(f"{source}: no such file (--data.path / --data.eval_path)")
    if path.suffix == ".parquet":
        return datasets.Dataset.from_parquet(str(path)), file_digest(path), lambda i: f"{source} row {i}"
    if path.stat().st_size < 4096 and not path.read_bytes().strip():
        raise DataError(f"{source}: the dataset is empty; expected at least one example")
    try:
        rows = datasets.Dataset.from_json(str(path))
    except Exception as error:  # Arrow's reader names no line: find it, and say what is wrong there
        scan_json(path, source)
        raise DataError(f"{source}: not readable as JSON rows ({str(error).strip().splitlines()[-1]})") from None
    if path.suffix != ".jsonl":
        return rows, file_digest(path), lambda i: f"{source} row {i}"
    return rows, file_digest(path), lambda i: f"{source}:{jsonl_line(path, i)}"


def jsonl_line(path: Path, index: int) -> int:
    """The line number of the index-th non-blank line (read only when an error needs it)."""
    seen = -1
    with path.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            seen += bool(line.strip())
            if seen == index:
                return lineno
    return index + 1


def scan_json(path: Path, source: str) -> None:
    """Python's reading of a file Arrow refused: raises DataError at the first bad line (encoding, syntax, type)."""
    text = decode_utf8(path.read_bytes(), source)
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{source}:{error.lineno}: malformed JSON ({error.msg}); expected a list of objects"
            ) from None
        if not isinstance(rows, list):
            raise DataError(f"{source}: expected a JSON list of objects, found {type(rows).__name__}")
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise DataError(f"{source} row {i}: expected a JSON object, found {type(row).__name__}")
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{source}:{lineno}: malformed JSON line ({error.msg}); expected one JSON object per line"
            ) from None
        if not isinstance(row, dict):
            raise DataError(f"{source}:{lineno}: expected a JSON object, found {type(row).__name__}")


def decode_utf8(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
        raise DataError(f"{source}:{line}: not valid UTF-8 (byte 0x{raw[error.start]:02x} at column {column}); "
                        "save the file as UTF-8") from None  # fmt: skip


def load_hub_dataset(source: str, split: str) -> tuple[datasets.Dataset, str, Callable[[int], str]]:
    """A Hub dataset id or a local dataset directory, through `datasets.load_dataset`."""
    if not Path(source).is_dir() and hub_unreachable():
        raise DataError(offline_advice(f"the dataset '{source}'"))
    try:
        dataset = datasets.load_dataset(source, split=split)
    except (FileNotFoundError, ValueError, ConnectionError) as error:
        raise DataError(
            f"{source}: could not load split '{split}' ({error}); check --data.path / --data.split "
            "(offline, give a local file or dataset directory)"
        ) from None
    return dataset, f"{source}:{split}:{dataset._fingerprint}", lambda i: f"{source} ({split}) row {i}"


class RowPlace:
    """How an error names row `index`, worked out only when an error message is formatted: `file:line` reads the file
    up to that row, which per row would make tokenizing a JSON-lines file quadratic in its length."""

    def __init__(self, where: Callable[[int], str], index: int) -> None:
        self.where, self.index = where, index

    def __str__(self) -> str:
        return self.where(self.index)


def render_row(row: dict[str, Any], data: DataConfig, builder: PromptBuilder, where: str | RowPlace) -> Prompt:
    """One row -> the prompt text and its supervised spans, per `data.format`."""

    def field(name: str) -> str:
        if name not in row:
            raise DataError(f"{where}: missing field '{name}' for --data.format={data.format}; row has {sorted(row)}")
        if not isinstance(row[name], str):
            raise DataError(f"{where}: field '{name}' must be a string, found {type(row[name]).__name__}")
        return row[name]

    if data.format == "text":
        text = field(data.text_field)
        if not text:
            raise DataError(f"{where}: empty '{data.text_field}'")
        prompt = Prompt()
        prompt.add_special(BOS)
        prompt.add_text("", text)
        prompt.add_special(EOS, supervised=True)
        return prompt
    if data.format == "alpaca":
        instruction, output = field(data.instruction_field), field(data.output_field)
        extra = row.get(data.input_field) or ""
        user = f"{instruction}\n{extra}" if extra else instruction
        return builder.build([(user, output)])
    return builder.build(*conversation_turns(row, data.messages_field, where))


def conversation_turns(
    row: dict[str, Any], key: str, where: str | RowPlace
) -> tuple[list[tuple[str, str]], str | None]:
    """`messages` = [system?] then alternating user/assistant, ending with an assistant answer."""
    messages = row.get(key)
    if messages is None:
        raise DataError(f"{where}: missing field '{key}' (--data.messages_field); expected a list of {{role, content}}")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: empty conversation; '{key}' needs at least a user and an assistant message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
            raise DataError(f"{where}: message {i} must be an object with string 'role' and 'content'")
    system = None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    if not messages:
        raise DataError(f"{where}: empty conversation; only a system message is present")
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise DataError(
                f"{where}: wrong role order: message {i + (system is not None)} has role "
                f"'{message['role']}', expected '{expected}' (system?, then user/assistant alternating)"
            )
    if len(messages) % 2:
        raise DataError(f"{where}: conversation ends with a user message; expected it to end with an assistant answer")
    turns = [(messages[i]["content"], messages[i + 1]["content"]) for i in range(0, len(messages), 2)]
    return turns, system
