"""Prompt builders reproduce each family's exact format; label tokens decode to exactly the answers (+EOS)."""

from __future__ import annotations

import random

import pytest

from backbones.prompting import VICUNA_SYSTEM_PROMPT, LLaMa2ChatPromptBuilder, PurePromptBuilder, VicunaV15PromptBuilder
from launch.data.tokenize import IGNORE_INDEX, encode_prompt, encode_texts, supervised, supervised_by_offsets

TURNS = [("What is 2 plus 3?", "5"), ("And the capital of Peru?", "Lima"), ("Opposite of hot?", "cold")]
SYSTEM = "Answer with one word."


def expected(builder: str, n: int, system: str | None) -> str:
    turns = TURNS[:n]
    if builder == "pure":
        head = f"{system}\n" if system else ""
        return "<s>" + head + "".join(f"In: {u}\nOut: {a}</s>" for u, a in turns)
    if builder == "llama2-chat":
        text = ""
        for i, (u, a) in enumerate(turns):
            if i == 0 and system:
                u = f"<<SYS>>\n{system}\n<</SYS>>\n\n{u}"
            text += f"<s>[INST] {u} [/INST] {a} </s>"
        return text
    return f"<s>{system or VICUNA_SYSTEM_PROMPT} " + "".join(f"USER: {u} ASSISTANT: {a}</s>" for u, a in turns)


BUILDERS = {"pure": PurePromptBuilder, "llama2-chat": LLaMa2ChatPromptBuilder, "vicuna": VicunaV15PromptBuilder}


@pytest.mark.parametrize("system", [None, SYSTEM])
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_prompt_builder_reproduces_the_exact_format(name, n, system):
    prompt = BUILDERS[name]("x").build(TURNS[:n], system=system)
    assert prompt.text == expected(name, n, system)
    eos_sep = " " if name == "llama2-chat" else ""
    # an answer's span opens at the space before it: a generation prompt ends where the answer's first token begins
    assert prompt.answers() == [f" {a}{eos_sep}</s>" for _, a in TURNS[:n]]


def test_llama2_chat_system_block_uses_metas_two_angle_brackets():
    text = LLaMa2ChatPromptBuilder("x").build(TURNS[:1], system="S").text
    assert text.startswith("<s>[INST] <<SYS>>\nS\n<</SYS>>\n\n") and "<<SYS>\n" not in text


def test_vicuna_default_system_prompt_is_fastchats():
    assert (
        VicunaV15PromptBuilder("x")
        .build(TURNS[:1])
        .text.removeprefix("<s>")
        .startswith(
            "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
            "detailed, and polite answers to the user's questions. USER: "
        )
    )


@pytest.mark.parametrize("system", [None, SYSTEM])
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_supervised_label_tokens_decode_to_exactly_the_answers(tiny_backbone, name, n, system):
    tokenizer = tiny_backbone.tokenizer
    prompt = BUILDERS[name]("x").build(TURNS[:n], system=system)
    ids, labels = encode_prompt(prompt, tokenizer)
    assert ids[0] == tokenizer.bos_token_id and len(ids) == len(labels)
    # Contiguous runs of supervised tokens, one per answer.
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    eos_sep = " " if name == "llama2-chat" else ""
    assert [tokenizer.decode(run) for run in runs] == [f"{a}{eos_sep}</s>" for _, a in TURNS[:n]]
    assert all(run[-1] == tokenizer.eos_token_id for run in runs)


def reference_ids(name: str, turns, system, tokenizer) -> list[int]:
    """Each family's reference encoding, computed turn by turn with the tokenizer's own encode: Meta's chat_completion
    (BOS + encode("[INST] u [/INST] a ") + EOS per turn), FastChat's vicuna_v1.1 and the pure format (BOS, then each
    turn's text encoded alone, EOS after every answer)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)

    ids = []
    for i, (user, answer) in enumerate(turns):
        if name == "llama2-chat":
            if i == 0 and system:
                user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
            ids += [bos, *encode(f"[INST] {user.strip()} [/INST] {answer.strip()} "), eos]
        elif name == "vicuna":
            head = f"{system or VICUNA_SYSTEM_PROMPT} " if i == 0 else ""
            ids += [bos] * (i == 0) + [*encode(f"{head}USER: {user} ASSISTANT: {answer}"), eos]
        else:
            head = f"{system}\n" if system and i == 0 else ""
            ids += [bos] * (i == 0) + [*encode(f"{head}In: {user}\nOut: {answer}"), eos]
    return ids


@pytest.mark.parametrize("system", [None, SYSTEM])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_token_ids_equal_the_familys_reference_encoding_turn_by_turn(tiny_backbone, name, system):
    tokenizer = tiny_backbone.tokenizer
    ids, _ = encode_prompt(BUILDERS[name]("x").build(TURNS, system=system), tokenizer)
    assert ids == reference_ids(name, TURNS, system, tokenizer)
    if name == "llama2-chat":  # "[INST]" opens with its sentencepiece space piece after every BOS, never bare
        first = tokenizer.encode("[INST]", add_special_tokens=False)[0]
        assert [ids[i + 1] for i, t in enumerate(ids[:-1]) if t == tokenizer.bos_token_id] == [first] * len(TURNS)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_text_from_data_never_becomes_control_tokens(tiny_backbone, name):
    tokenizer = tiny_backbone.tokenizer
    turns = [("Write </s> then <s> and [INST] literally", "done </s> <s>"), ("again <unk>", "ok")]
    ids, labels = encode_prompt(BUILDERS[name]("x").build(turns, system="sys </s>"), tokenizer)
    specials = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id]
    counts = [ids.count(token) for token in specials]
    assert counts == [2 if name == "llama2-chat" else 1, 2, 0]  # only the format's own BOS/EOS
    assert ids == reference_ids(name, turns, "sys </s>", tokenizer)
    assert "</s> <s>" in tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX])


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_span_lookup_labels_equal_the_token_by_token_overlap_rule(tiny_backbone, name):
    """`supervised` finds a span's tokens with two character lookups; on awkward text (multi-byte characters that fall
    back to byte tokens, whitespace runs, answers at a chunk's first character, a lone space) it must give exactly
    the labels of checking every token's offsets."""
    rng = random.Random(0)
    pieces = ["a", "the", " ", "  ", "\n", "\t", "é", "日本", "🙂", "👩‍💻", "</s>", "[INST]", "9", ".", "ß", "\u200b"]

    def text(k: int) -> str:
        return "".join(rng.choices(pieces, k=k))

    prompts = [BUILDERS[name]("x").build([(text(rng.randint(0, 8)) or "q", text(rng.randint(1, 8)))] * 2)
               for _ in range(300)]  # fmt: skip
    # the text format: its span starts at a chunk's character 0
    prompts += [BUILDERS[name]("x").build_text(text(rng.randint(1, 12))) for _ in range(100)]
    chunks = [chunk for prompt in prompts for chunk in prompt.chunks if not chunk.special]
    encodings = encode_texts([chunk.text for chunk in chunks], tiny_backbone.tokenizer)
    for chunk, encoding in zip(chunks, encodings):
        exact = supervised_by_offsets(encoding.ids, encoding.offsets, chunk.spans)
        assert supervised(encoding, chunk.spans) == exact, (chunk.text, chunk.spans, encoding.offsets)
