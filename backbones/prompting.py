"""Prompt builders: turn a multi-turn conversation into exactly what a model family was trained on.

A prompt is a list of chunks: text, tokenized on its own the way the family's reference tokenizes it (sentencepiece,
with its dummy-prefix space), and BOS/EOS markers that become the special token ids. Text from data is never parsed
for special tokens: a user who writes `</s>` gets the characters, not EOS. Each chunk says which of its characters
are supervised (assistant answers and the EOS after them); nothing else is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

# FastChat's default Vicuna v1.1/v1.5 system prompt (fastchat/conversation.py, "vicuna_v1.1").
VICUNA_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
BOS, EOS = "<s>", "</s>"  # how the special tokens read in the prompt's text form


@dataclass
class Chunk:
    text: str = ""  # plain text (empty for a special token)
    special: str | None = None  # BOS or EOS: a token id, not text
    spans: list[tuple[int, int]] = field(default_factory=list)  # supervised [start, end) characters of `text`
    supervised: bool = False  # for a special token

    @property
    def shown(self) -> str:
        return self.special or self.text


@dataclass
class Prompt:
    chunks: list[Chunk] = field(default_factory=list)

    def add_text(self, text: str, answer: str = "", after: str = "") -> None:
        """`text` then a supervised `answer` then `after`, appended to the current text chunk (or a new one)."""
        if not self.chunks or self.chunks[-1].special:
            self.chunks.append(Chunk())
        chunk = self.chunks[-1]
        chunk.text += text
        if answer:
            chunk.spans.append((len(chunk.text), len(chunk.text) + len(answer)))
        chunk.text += answer + after

    def add_special(self, token: str, supervised: bool = False) -> None:
        self.chunks.append(Chunk(special=token, supervised=supervised))

    @property
    def text(self) -> str:
        """The prompt as one string, special tokens written as `<s>` / `</s>` (what chat templates render)."""
        return "".join(chunk.shown for chunk in self.chunks)

    @property
    def answer_spans(self) -> list[tuple[int, int]]:
        """Supervised spans of `text` (an answer and the EOS right after it form one span)."""
        spans, offset = [], 0
        for chunk in self.chunks:
            pieces = [(offset + a, offset + b) for a, b in chunk.spans]
            if chunk.special and chunk.supervised:
                pieces = [(offset, offset + len(chunk.shown))]
            for a, b in pieces:
                if spans and spans[-1][1] == a:
                    spans[-1] = (spans[-1][0], b)
                else:
                    spans.append((a, b))
            offset += len(chunk.shown)
        return spans

    def answers(self) -> list[str]:
        return [self.text[a:b] for a, b in self.answer_spans]

    def until_answer(self, index: int = 0) -> Prompt:
        """The prompt up to (not including) answer `index`, trailing space removed: what generation starts from."""
        prompt, seen = Prompt(), 0
        for chunk in self.chunks:
            if chunk.special:
                prompt.chunks.append(Chunk(special=chunk.special))
                continue
            for a, _ in chunk.spans:
                if seen == index:
                    prompt.chunks.append(Chunk(text=chunk.text[:a].rstrip(" ")))
                    return prompt
                seen += 1
            prompt.chunks.append(Chunk(text=chunk.text))
        raise IndexError(f"the prompt has {seen} answers, not {index + 1}")


class PromptBuilder:
    """Base class: `build(turns, system)` where turns are (user, assistant) pairs, in order. `chat_template` renders
    the same text with transformers' `apply_chat_template` (exported with every model), and with
    `add_generation_prompt` the text up to an answer, as `Prompt.until_answer` gives it."""

    chat_template: str = ""

    def __init__(self, model_family: str) -> None:
        self.model_family = model_family

    def build(self, turns: Sequence[tuple[str, str]], system: str | None = None) -> Prompt:
        if not turns:
            raise ValueError("a conversation needs at least one (user, assistant) turn")
        prompt = Prompt()
        for index, (user, answer) in enumerate(turns):
            self.add_turn(prompt, index, user, answer, system)
        return prompt

    def add_turn(self, prompt: Prompt, index: int, user: str, answer: str, system: str | None) -> None:
        raise NotImplementedError

    def build_text(self, text: str) -> Prompt:
        """A plain document (no turns), supervised whole, between BOS and EOS."""
        prompt = Prompt()
        prompt.add_special(BOS)
        prompt.add_text("", text)
        prompt.add_special(EOS, supervised=True)
        return prompt


# Shared head of the chat templates: an optional system message, then user/assistant turns.
_SYSTEM = (
    "{%- if messages and messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
    "{%- set turns = messages[1:] -%}{%- else -%}{%- set system = none -%}{%- set turns = messages -%}{%- endif -%}"
)


class PurePromptBuilder(PromptBuilder):
    """`<s>In: {user}\\nOut: {answer}</s>In: ...`; a system prompt, if any, is a first line of its own."""

    chat_template = _SYSTEM + (
        "{{- bos_token -}}{%- if system -%}{{- system + '\\n' -}}{%- endif -%}"
        "{%- for message in turns -%}"
        "{%- if message['role'] == 'user' -%}{{- 'In: ' + message['content'] + '\\nOut:' -}}"
        "{%- else -%}{{- ' ' + message['content'] + eos_token -}}{%- endif -%}"
        "{%- endfor -%}"
    )

    def add_turn(self, prompt: Prompt, index: int, user: str, answer: str, system: str | None) -> None:
        if index == 0:
            prompt.add_special(BOS)
        head = f"{system}\n" if system and index == 0 else ""
        prompt.add_text(f"{head}In: {user}\nOut: ", answer)
        prompt.add_special(EOS, supervised=True)


class LLaMa2ChatPromptBuilder(PromptBuilder):
    """Meta's LLaMA-2 chat format (llama/generation.py, chat_completion): each turn is BOS, then
    `[INST] {user} [/INST] {answer} ` tokenized on its own, then EOS; the system prompt opens the first user message
    as `<<SYS>>\\n{system}\\n<</SYS>>\\n\\n`. Contents are stripped, as Meta's code does."""

    chat_template = _SYSTEM + (
        "{%- for message in turns -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- set content = message['content'] | trim -%}"
        "{%- if loop.first and system -%}"
        "{%- set content = ('<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + content) | trim -%}"
        "{%- endif -%}"
        "{{- bos_token + '[INST] ' + content + ' [/INST]' -}}"
        "{%- else -%}{{- ' ' + (message['content'] | trim) + ' ' + eos_token -}}{%- endif -%}"
        "{%- endfor -%}"
    )

    def add_turn(self, prompt: Prompt, index: int, user: str, answer: str, system: str | None) -> None:
        user = user.strip()
        if index == 0 and system:
            user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}".strip()
        prompt.add_special(BOS)
        prompt.add_text(f"[INST] {user} [/INST] ", f"{answer.strip()} ")
        prompt.add_special(EOS, supervised=True)


class VicunaV15PromptBuilder(PromptBuilder):
    """FastChat's vicuna_v1.1 template (used by v1.5): `{system} USER: {user} ASSISTANT: {answer}</s>USER: ...`."""

    chat_template = _SYSTEM + (
        "{{- bos_token + (system or '" + VICUNA_SYSTEM_PROMPT.replace("'", "\\'") + "') + ' ' -}}"
        "{%- for message in turns -%}"
        "{%- if message['role'] == 'user' -%}{{- 'USER: ' + message['content'] + ' ASSISTANT:' -}}"
        "{%- else -%}{{- ' ' + message['content'] + eos_token -}}{%- endif -%}"
        "{%- endfor -%}"
    )

    def add_turn(self, prompt: Prompt, index: int, user: str, answer: str, system: str | None) -> None:
        if index == 0:
            prompt.add_special(BOS)
        head = f"{system or VICUNA_SYSTEM_PROMPT} " if index == 0 else ""
        prompt.add_text(f"{head}USER: {user} ASSISTANT: ", answer)
        prompt.add_special(EOS, supervised=True)
