"""Prompt builders: turn a multi-turn conversation into the exact text a model family was trained on, and say which
character spans of that text are assistant answers (the only tokens the SFT loss supervises)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

# FastChat's default Vicuna v1.1/v1.5 system prompt (fastchat/conversation.py, "vicuna_v1.1").
VICUNA_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass
class Prompt:
    """The rendered text and the [start, end) character spans that are supervised (an answer and its EOS)."""

    text: str
    answer_spans: list[tuple[int, int]] = field(default_factory=list)
    # True when the text itself starts with the BOS string (LLaMa-2 chat writes `<s>` per turn).
    has_bos: bool = False

    def answers(self) -> list[str]:
        return [self.text[a:b] for a, b in self.answer_spans]


class PromptBuilder:
    """Base class: `build(turns, system)` where turns are (user, assistant) pairs, in order."""

    bos = "<s>"
    eos = "</s>"

    def __init__(self, model_family: str) -> None:
        self.model_family = model_family

    def build(self, turns: Sequence[tuple[str, str]], system: str | None = None) -> Prompt:
        if not turns:
            raise ValueError("a conversation needs at least one (user, assistant) turn")
        prompt = Prompt(text="")
        for index, (user, answer) in enumerate(turns):
            prefix, suffix = self.render_turn(index, user, system)
            prompt.text += prefix
            start = len(prompt.text)
            prompt.text += answer + suffix
            prompt.answer_spans.append((start, len(prompt.text)))
        prompt.has_bos = prompt.text.startswith(self.bos)
        return prompt

    def render_turn(self, index: int, user: str, system: str | None) -> tuple[str, str]:
        """The text before the answer and the supervised terminator after it."""
        raise NotImplementedError


class PurePromptBuilder(PromptBuilder):
    """`In: {user}\\nOut: {answer}</s>` per turn; a system prompt, if any, is a first line of its own."""

    def render_turn(self, index: int, user: str, system: str | None) -> tuple[str, str]:
        head = f"{system}\n" if system and index == 0 else ""
        return f"{head}In: {user}\nOut: ", self.eos


class LLaMa2ChatPromptBuilder(PromptBuilder):
    """Meta's published LLaMA-2 chat format (llama/generation.py): `<<SYS>>\\n` with both angle brackets."""

    def render_turn(self, index: int, user: str, system: str | None) -> tuple[str, str]:
        if index == 0 and system:
            user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
        return f"{self.bos}[INST] {user} [/INST] ", f" {self.eos}"


class VicunaV15PromptBuilder(PromptBuilder):
    """FastChat's vicuna_v1.1 template (used by v1.5): `{system} USER: {user} ASSISTANT: {answer}</s>`."""

    def render_turn(self, index: int, user: str, system: str | None) -> tuple[str, str]:
        head = f"{system or VICUNA_SYSTEM_PROMPT} " if index == 0 else ""
        return f"{head}USER: {user} ASSISTANT: ", self.eos
