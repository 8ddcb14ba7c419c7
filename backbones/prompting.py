"""Prompt builders: turn a multi-turn conversation into exactly what a model family was trained on.

A prompt is a list of chunks: text, tokenized on its own the way the family's reference tokenizes it (sentencepiece,
with its dummy-prefix space), and special-token markers that become their ids: BOS/EOS (the tokenizer's own) or a
special token by name (`<|eot_id|>`). Text from data is never parsed
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
BOS, EOS = "<s>", "</s>"  # the tokenizer's BOS/EOS (and how they read in the prompt's text form)


@dataclass
class Chunk:
    text: str = ""  # plain text (empty for a special token)
    special: str | None = None  # BOS, EOS or a special token's name: a token id, not text
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
        """The prompt up to (not including) answer `index`: what generation starts from."""
        prompt, seen = Prompt(), 0
        for chunk in self.chunks:
            if chunk.special:
                prompt.chunks.append(Chunk(special=chunk.special))
                continue
            for a, _ in chunk.spans:
                if seen == index:
                    prompt.chunks.append(Chunk(text=chunk.text[:a]))
                    return prompt
                seen += 1
            prompt.chunks.append(Chunk(text=chunk.text))
        raise IndexError(f"the prompt has {seen} answers, not {index + 1}")


class PromptBuilder:
    """Base class: `build(turns, system)` where turns are (user, assistant) pairs, in order. `chat_template` renders
    the same text with transformers' `apply_chat_template` (exported with every model, after the `esc` macro of
    `template_for`), and with `add_generation_prompt` the text up to an answer, as `Prompt.until_answer` gives it."""

    chat_template: str = ""

    @classmethod
    def template_for(cls, specials: Sequence[str], added: Sequence[str] = ()) -> str:
        """The chat template for a tokenizer with these special tokens (and other added tokens)."""
        return escape_macro(specials, added) + cls.chat_template

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


# Control strings in text stay text in the exported chat template too: the template writes this invisible separator
# inside every special token's name where message content spells one (`<s>` -> `<\u2063s>`), so the tokenizer's
# special-token matching never sees it there, and the exported tokenizer's normalizer deletes the separator before
# tokenizing (backbones/base.py), so the content's ids are those the training pipeline gives it.
ESCAPE = "\u2063"  # U+2063 INVISIBLE SEPARATOR


def escape_macro(specials: Sequence[str], added: Sequence[str] = ()) -> str:
    """The Jinja macro `esc(text)` that breaks every special token's name in `text`: by its first two characters
    (one replace covers many tokens, e.g. Llama 3's 256 `<|...|>`), or by its whole name where those two characters
    also begin an added token that is not special (Qwen3's `<|fim_prefix|>` is matched in text, and must stay so)."""
    unsafe = {token[:2] for token in added}
    pieces = set()
    for token in specials:
        if "'" in token or "\\" in token:
            raise ValueError(f"special token {token!r}: quotes and backslashes cannot be escaped in a chat template")
        pieces.add(token if token[:2] in unsafe else token[:2])
    filters = "".join(
        f" | replace('{p}', '{p[0] + ESCAPE + p[1:]}')" for p in sorted(pieces, key=lambda p: (-len(p), p))
    )
    return "{%- macro esc(text) -%}{{- text" + filters + " -}}{%- endmacro -%}"


# Shared head of the chat templates: an optional system message, then user/assistant turns.
_SYSTEM = (
    "{%- if messages and messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
    "{%- set turns = messages[1:] -%}{%- else -%}{%- set system = none -%}{%- set turns = messages -%}{%- endif -%}"
)


class PurePromptBuilder(PromptBuilder):
    """`<s>{system}\nIn: {user}\nOut: {answer}</s>In: ...`; the system line only when there is a system message. The
    answer's span starts at the space after `Out:`: a generation prompt ends at `Out:`."""

    chat_template = _SYSTEM + (
        "{{- bos_token or '' -}}{%- if system is not none -%}{{- esc(system) + '\n' -}}{%- endif -%}"
        "{%- for message in turns -%}"
        "{%- if message['role'] == 'user' -%}{{- 'In: ' + esc(message['content']) + '\nOut:' -}}"
        "{%- else -%}{{- ' ' + esc(message['content']) + eos_token -}}{%- endif -%}"
        "{%- endfor -%}"
    )

    def add_turn(self, prompt: Prompt, index: int, user: str, answer: str, system: str | None) -> None:
        if index == 0:
            prompt.add_special(BOS)
        head = f"{system}\n" if system is not None and index == 0 else ""
        prompt.add_text(f"{head}In: {user}\nOut:", f" {answer}")
        prompt.add_special(EOS, supervised=True)


class LLaMa2ChatPromptBuilder(PromptBuilder):
    """Meta's LLaMA-2 chat format (llama/generation.py, chat_completion): each turn is BOS, then
    `[INST] {user} [/INST] {answer} ` tokenized on its own, then EOS; a system message, empty or not, opens the first
    user message as `<<SYS>>\n{system}\n<</SYS>>\n\n`, and the joined content is stripped, as Meta's code does. The
    answer's span starts at the space after `[/INST]`, which sentencepiece gives a token of its own before a digit, an
    emoji, CJK or punctuation: the first token the model must produce."""

    chat_template = _SYSTEM + (
        "{%- for message in turns -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- if loop.first and system is not none -%}"
        "{%- set content = ('<<SYS>>\\n' + esc(system) + '\\n<</SYS>>\\n\\n' + esc(message['content'])) | trim -%}"
        "{%- else -%}{%- set content = esc(message['content'] | trim) -%}{%- endif -%}"
        "{{- bos_token + '[INST] ' + content + ' [/INST]' -}}"
        "{%- else -%}{{- ' ' + esc(message['content'] | trim) + ' ' + eos_token -}}{%- endif -%}"
        "{%- endfor -%}"
    )

    def add_turn(self, prompt: Prompt, index: int, user: str, answer: str, system: str | None) -> None:
        if index == 0 and system is not None:
            user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
        prompt.add_special(BOS)
        prompt.add_text(f"[INST] {user.strip()} [/INST]", f" {answer.strip()} ")
        prompt.add_special(EOS, supervised=True)


class VicunaV15PromptBuilder(PromptBuilder):
    """FastChat's vicuna_v1.1 template (used by v1.5): `{system} USER: {user} ASSISTANT: {answer}</s>USER: ...`,
    FastChat's default system prompt unless the conversation brings its own (an empty one too). Contents are not
    stripped, as FastChat does not strip them. The answer's span starts at the space after `ASSISTANT:`."""

    chat_template = _SYSTEM + (
        "{{- bos_token + (esc(system) if system is not none else '"
        + VICUNA_SYSTEM_PROMPT.replace("'", "\\'")
        + "') + ' ' -}}"
        "{%- for message in turns -%}"
        "{%- if message['role'] == 'user' -%}{{- 'USER: ' + esc(message['content']) + ' ASSISTANT:' -}}"
        "{%- else -%}{{- ' ' + esc(message['content']) + eos_token -}}{%- endif -%}"
        "{%- endfor -%}"
    )

    def add_turn(self, prompt: Prompt, index: int, user: str, answer: str, system: str | None) -> None:
        if index == 0:
            prompt.add_special(BOS)
        head = f"{system if system is not None else VICUNA_SYSTEM_PROMPT} " if index == 0 else ""
        prompt.add_text(f"{head}USER: {user} ASSISTANT:", f" {answer}")
        prompt.add_special(EOS, supervised=True)
