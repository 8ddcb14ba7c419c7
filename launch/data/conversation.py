"""Stage 2 of the data pipeline: a row -> a conversation, by `--data.format`, with every problem named at its place.

- chat: `messages` = an optional system message, then user/assistant turns alternating, ending with an answer;
- alpaca: instruction (+ input) -> output, one turn;
- text: a document, supervised whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from launch.config import DataConfig
from launch.data.sources import DataError, Place


@dataclass(frozen=True)
class Conversation:
    turns: tuple[tuple[str, str], ...] = ()  # (user, assistant) pairs, in order
    system: str | None = None
    text: str | None = None  # --data.format text: a plain document instead of turns


def row_to_conversation(row: dict[str, Any], data: DataConfig, place: Place | str) -> Conversation:
    def field(name: str) -> str:
        if name not in row:
            raise DataError(f"{place}: missing field '{name}' for --data.format={data.format}; row has {sorted(row)}")
        if not isinstance(row[name], str):
            raise DataError(f"{place}: field '{name}' must be a string, found {type(row[name]).__name__}")
        return row[name]

    if data.format == "text":
        text = field(data.text_field)
        if not text:
            raise DataError(f"{place}: empty '{data.text_field}'")
        return Conversation(text=text)
    if data.format == "alpaca":
        instruction, output = field(data.instruction_field), field(data.output_field)
        extra = row.get(data.input_field) or ""
        if not isinstance(extra, str):
            raise DataError(f"{place}: field '{data.input_field}' must be a string, found {type(extra).__name__}")
        return Conversation(turns=((f"{instruction}\n{extra}" if extra else instruction, output),))
    return chat_conversation(row, data.messages_field, place)


def chat_conversation(row: dict[str, Any], key: str, place: Place | str) -> Conversation:
    """`messages` = [system?] then alternating user/assistant, ending with an assistant answer."""
    messages = row.get(key)
    if messages is None:
        raise DataError(f"{place}: missing field '{key}' (--data.messages_field); expected a list of {{role, content}}")
    if not isinstance(messages, list):
        raise DataError(f"{place}: field '{key}' must be a list of {{role, content}} messages, found "
                        f"{type(messages).__name__}")  # fmt: skip
    if not messages:
        raise DataError(f"{place}: empty conversation; '{key}' needs at least a user and an assistant message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
            raise DataError(f"{place}: message {i} must be an object with string 'role' and 'content'")
    system = None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    if not messages:
        raise DataError(f"{place}: empty conversation; only a system message is present")
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise DataError(
                f"{place}: wrong role order: message {i + (system is not None)} has role "
                f"'{message['role']}', expected '{expected}' (system?, then user/assistant alternating)"
            )
    if len(messages) % 2:
        raise DataError(f"{place}: conversation ends with a user message; expected it to end with an assistant answer")
    turns = tuple((messages[i]["content"], messages[i + 1]["content"]) for i in range(0, len(messages), 2))
    return Conversation(turns=turns, system=system)
