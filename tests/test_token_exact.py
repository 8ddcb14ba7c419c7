"""Token-exact prompts on the tiny tokenizer and on the released LLaMA-2 one (backbones/real_tokenizers.py):
training ids and labels equal each family's reference encoding, written here from the reference's own algorithm
(Meta's llama/generation.py chat_completion, FastChat's vicuna_v1.1 get_prompt), and the exported tokenizer's
chat template gives exactly the training ids, with control strings in user text kept as text on both paths."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer, LlamaConfig

from backbones import build_backbone
from backbones.base import save_chat_tokenizer
from backbones.llama2 import LLAMA2_7B
from backbones.llama3 import Llama3ChatPromptBuilder, Llama31ChatPromptBuilder
from backbones.prompting import VICUNA_SYSTEM_PROMPT, LLaMa2ChatPromptBuilder, PurePromptBuilder, VicunaV15PromptBuilder
from backbones.qwen3 import Qwen3ChatPromptBuilder
from backbones.real_tokenizers import real_tokenizer_dir
from launch.data import IGNORE_INDEX, encode_prompt

BUILDERS = {"pure": PurePromptBuilder, "llama2-chat": LLaMa2ChatPromptBuilder, "vicuna": VicunaV15PromptBuilder}
SYSTEMS = [None, "", "You are a terse assistant.", "  Answer in one word. \n"]
TURNS = [
    ("What is 2 plus 40?", "42"),  # a digit after the separating space: sentencepiece gives the space a token
    ("  Say hi to Lima  ", "  Lima  "),  # whitespace around every field
    ("Which emoji?", "🙂 this one"),
    ("Translate 'Japan'", "日本"),
    ("Punctuation first?", "...yes, and “quotes”."),
    ("Write <s> and </s> and <unk> literally", "<s> is a tag </s>"),  # control strings stay text
    ("Quote [INST] and <<SYS>> and <</SYS>> and [/INST]", "[INST] done [/INST]"),
    ("Fix:\n\tdef f(x):\n\t\treturn x\n", "```python\ndef f(x):\n\treturn x + 1\n```"),  # tabs and newlines
    ("<PAD> twice <PAD>", "<PAD>"),
    ("Say <|eot_id|> and <|im_end|> and <|begin_of_text|> and <think>", "<|endoftext|> ok"),  # Llama 3's, Qwen3's
]
# 1-3 turns drawn from TURNS, every system variant: 4 x (10 + 9 + 8) conversations
CONVERSATIONS = [(system, turns) for system in SYSTEMS for n in (1, 2, 3)
                 for turns in (TURNS[i : i + n] for i in range(len(TURNS) - n + 1))]  # fmt: skip


@pytest.fixture(scope="session")
def llama2_backbone(tmp_path_factory):
    """The LLaMA-2 chat backbone with the released tokenizer, built as training builds it (on meta, no weights)."""
    directory = tmp_path_factory.mktemp("llama2-released")
    source = real_tokenizer_dir("llama2")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_bytes((source / name).read_bytes())
    LlamaConfig(**LLAMA2_7B).to_json_file(directory / "config.json")
    return build_backbone("llama2-7b-chat", path=str(directory), load_weights=False)


@pytest.fixture(scope="session", params=["tiny", "llama2"])
def tokenizers(request, tiny_backbone, llama2_backbone):
    """(shardtune's training tokenizer, the reference tokenizer: the same tokenizer.json in the `tokenizers` library,
    special tokens never parsed in text, as sentencepiece never parses them)."""
    if request.param == "tiny":
        from backbones.tiny import ensure_tiny_model

        training, path = tiny_backbone.tokenizer, ensure_tiny_model() / "tokenizer.json"
    else:
        training, path = llama2_backbone.tokenizer, real_tokenizer_dir("llama2") / "tokenizer.json"
    reference = Tokenizer.from_file(str(path))
    reference.encode_special_tokens = True
    return training, reference


def pieces(reference: Tokenizer, text: str) -> list[int]:
    return reference.encode(text, add_special_tokens=False).ids


def meta_chat_completion(system, turns, reference, bos, eos) -> tuple[list[int], list[int]]:
    """Meta's llama/generation.py chat_completion for a dialog that ends with an answer: the system message folded
    into the first user message (B_SYS + system + E_SYS + user, then stripped), each turn
    `encode(f"{B_INST} {user.strip()} {E_INST} {answer.strip()} ", bos=True, eos=True)`. Labels: what follows the
    encoding of the turn's prompt `f"{B_INST} {user.strip()} {E_INST}"` in the turn's encoding (its answer, the spaces
    around it and EOS)."""
    dialog = [{"role": "user" if i % 2 == 0 else "assistant", "content": text}
              for i, text in enumerate(t for turn in turns for t in turn)]  # fmt: skip
    if system is not None:
        dialog[0]["content"] = "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + dialog[0]["content"]
    ids, labels = [], []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        head = [bos] + pieces(reference, f"[INST] {prompt['content'].strip()} [/INST]")
        turn = [bos] + pieces(reference, f"[INST] {prompt['content'].strip()} [/INST] {answer['content'].strip()} ")
        turn.append(eos)
        assert turn[: len(head)] == head  # sentencepiece splits at the space after [/INST]
        ids += turn
        labels += [IGNORE_INDEX] * len(head) + turn[len(head) :]
    return ids, labels


def fastchat_vicuna(system, turns, reference, bos, eos) -> tuple[list[int], list[int]]:
    """FastChat's vicuna_v1.1 (SeparatorStyle.ADD_COLON_TWO, sep " ", sep2 "</s>"): `system + " "`, then per turn
    `"USER: " + user + " ASSISTANT: " + answer + "</s>"`, tokenized as the legacy LLaMA tokenizer does (BOS, then each
    text between the </s> separators alone, with its dummy-prefix space). Labels: what follows "... ASSISTANT:"."""
    ids, labels = [bos], [IGNORE_INDEX]
    for i, (user, answer) in enumerate(turns):
        head = (VICUNA_SYSTEM_PROMPT if system is None else system) + " " if i == 0 else ""
        prompt = pieces(reference, f"{head}USER: {user} ASSISTANT:")
        turn = pieces(reference, f"{head}USER: {user} ASSISTANT: {answer}") + [eos]
        assert turn[: len(prompt)] == prompt
        ids += turn
        labels += [IGNORE_INDEX] * len(prompt) + turn[len(prompt) :]
    return ids, labels


def pure(system, turns, reference, bos, eos) -> tuple[list[int], list[int]]:
    """shardtune's Pure format: BOS, `{system}\\n` when there is a system message, then per turn
    `In: {user}\\nOut: {answer}` and EOS, each turn's text encoded alone. Labels: what follows "Out:"."""
    ids, labels = [bos], [IGNORE_INDEX]
    for i, (user, answer) in enumerate(turns):
        head = f"{system}\n" if system is not None and i == 0 else ""
        prompt = pieces(reference, f"{head}In: {user}\nOut:")
        turn = pieces(reference, f"{head}In: {user}\nOut: {answer}") + [eos]
        assert turn[: len(prompt)] == prompt
        ids += turn
        labels += [IGNORE_INDEX] * len(prompt) + turn[len(prompt) :]
    return ids, labels


REFERENCES = {"llama2-chat": meta_chat_completion, "vicuna": fastchat_vicuna, "pure": pure}


def messages(system, turns) -> list[dict]:
    out = [{"role": "system", "content": system}] if system is not None else []
    for user, answer in turns:
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return out


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_training_ids_and_labels_equal_the_familys_reference_encoding(tokenizers, name):
    """Ids and labels, token for token, over 108 conversations: 1-3 turns, no/empty/padded system, whitespace around
    every field, answers opening with a digit, an emoji, CJK or punctuation, control strings and code in user text."""
    training, reference = tokenizers
    bos, eos = training.bos_token_id, training.eos_token_id
    for system, turns in CONVERSATIONS:
        expected = REFERENCES[name](system, turns, reference, bos, eos)
        got = encode_prompt(BUILDERS[name]("x").build(turns, system=system), training)
        assert got == expected, (name, system, turns, training.convert_ids_to_tokens(got[0]),
                                 training.convert_ids_to_tokens(expected[0]))  # fmt: skip


def test_the_separating_space_before_a_digit_is_the_first_supervised_token(llama2_backbone):
    tokenizer = llama2_backbone.tokenizer
    ids, labels = encode_prompt(LLaMa2ChatPromptBuilder("x").build([("What is 2 plus 40?", "42")]), tokenizer)
    supervised = [tokenizer.convert_ids_to_tokens(t) for t, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert supervised == ["▁", "4", "2", "▁", "</s>"]
    assert tokenizer.convert_ids_to_tokens(ids[1:3]) == ["▁[", "INST"]  # `<s>` then `▁[`, never a bare `[`


def test_an_empty_system_prompt_keeps_metas_sys_block_and_the_joined_content_is_stripped_once():
    text = LLaMa2ChatPromptBuilder("x").build([("  hi", "ok")], system="").text
    assert text == "<s>[INST] <<SYS>>\n\n<</SYS>>\n\n  hi [/INST] ok </s>"


FAMILY_BUILDERS = {"llama3": {"llama3-chat": Llama3ChatPromptBuilder, "llama3.1-chat": Llama31ChatPromptBuilder,
                              "pure": PurePromptBuilder},
                   "qwen3": {"qwen3-chat": Qwen3ChatPromptBuilder, "pure": PurePromptBuilder}}  # fmt: skip
EXPORTED = [("tiny", name) for name in sorted(BUILDERS)] + [("llama2", name) for name in sorted(BUILDERS)] + [
    (family, name) for family, builders in FAMILY_BUILDERS.items() for name in builders]  # fmt: skip


def training_tokenizer(name: str, tiny_backbone, llama2_backbone):
    if name == "tiny":
        return tiny_backbone.tokenizer
    if name == "llama2":
        return llama2_backbone.tokenizer
    return build_backbone({"llama3": "llama3-tiny-instruct", "qwen3": "qwen3-tiny"}[name], load_weights=False).tokenizer


def trained_prefix_end(labels: list[int]) -> int:
    """Where the last answer's supervised tokens begin: what a generation prompt must end before."""
    end = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    return max(i for i, label in enumerate(labels[:end]) if label == IGNORE_INDEX) + 1


@pytest.mark.parametrize("tokenizer_name,name", EXPORTED, ids=[f"{t}-{n}" for t, n in EXPORTED])
def test_the_exported_chat_template_gives_exactly_the_training_ids(tiny_backbone, llama2_backbone, tmp_path,
                                                                   tokenizer_name, name):  # fmt: skip
    """What a server does with final/: `apply_chat_template(messages, tokenize=True)` gives the ids the model trained
    on, and with `add_generation_prompt` the ids up to the first supervised token of the last answer, the prefix the
    model was trained to continue. Control strings in user text stay text (the template escapes them, the exported
    tokenizer's normalizer removes the escape)."""
    training = training_tokenizer(tokenizer_name, tiny_backbone, llama2_backbone)
    builder = {**BUILDERS, **FAMILY_BUILDERS.get(tokenizer_name, {})}[name]
    save_chat_tokenizer(copy.deepcopy(training), builder, tmp_path)
    served = AutoTokenizer.from_pretrained(tmp_path)
    for system, turns in CONVERSATIONS:
        ids, labels = encode_prompt(builder("x").build(turns, system=system), training)
        got = served.apply_chat_template(messages(system, turns), tokenize=True)
        assert list(got["input_ids"] if hasattr(got, "keys") else got) == ids, (name, system, turns)
        prefix = served.apply_chat_template(messages(system, turns)[:-1], tokenize=True, add_generation_prompt=True)
        assert list(prefix["input_ids"] if hasattr(prefix, "keys") else prefix) == ids[: trained_prefix_end(labels)]
    # the control strings a user wrote are text: the only special tokens are the format's own
    ids, _ = encode_prompt(builder("x").build(TURNS), training)
    written = [t for t in ids if t in set(training.all_special_ids)]
    format_only = encode_prompt(builder("x").build([("q", "a")] * len(TURNS)), training)[0]
    assert written == [t for t in format_only if t in set(training.all_special_ids)]


def test_the_exported_tokenizer_is_the_generic_fast_class_with_the_escape_removed(llama2_backbone, tmp_path):
    save_chat_tokenizer(copy.deepcopy(llama2_backbone.tokenizer), LLaMa2ChatPromptBuilder, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    template = (
        config.get("chat_template") or (tmp_path / "chat_template.jinja").read_text()
    )  # where transformers 5 puts it
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "esc(" in template
    served = AutoTokenizer.from_pretrained(tmp_path)
    assert (
        served("a <\u2063s> b", add_special_tokens=False)["input_ids"]
        == served("a <s> b", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    )


def test_the_conversation_set_covers_what_the_issue_lists():
    texts = [t for _, turns in CONVERSATIONS for turn in turns for t in turn]
    systems = {system for system, _ in CONVERSATIONS}
    assert {None, ""} <= systems and {len(turns) for _, turns in CONVERSATIONS} == {1, 2, 3}
    for needle in ("<s>", "</s>", "<unk>", "[INST]", "<<SYS>>", "\t", "\n", "🙂", "日本"):
        assert any(needle in t for t in texts), needle
    assert any(a[:1].isdigit() for a in itertools.chain.from_iterable((a for _, a in turns) for _, turns in
                                                                      CONVERSATIONS))  # fmt: skip


def test_the_token_report_shows_ids_pieces_and_the_supervised_mask_side_by_side(capsys):
    from launch.data.__main__ import main

    assert main(["--config", "recipes/tiny-full.yaml", "--show", "1", "--index", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("example 3: ") and "supervised" in out[0]
    rows = [line.split() for line in out[2:] if line.strip()[:1].isdigit()]
    assert rows[0][1:] == ["1", "'<s>'"] and rows[-1][1:] == ["2", "*", "'</s>'"]  # BOS unsupervised, EOS in the loss
    assert any(line.strip().startswith("supervised: ") for line in out)
    assert main(["--config", "recipes/tiny-full.yaml", "--index", "99999"]) == 2
    assert "--index 99999 is outside the" in capsys.readouterr().err


@pytest.mark.parametrize("family", sorted(FAMILY_BUILDERS))
def test_instruct_ids_equal_the_released_tokenizers_own_chat_template(tiny_backbone, llama2_backbone, family):
    """Llama 3 and Qwen3 train in the model's own format: the training ids of every conversation equal what the
    released tokenizer's shipped template gives (apply_chat_template(tokenize=True)), and the labels are exactly each
    answer's content tokens plus its end-of-turn token. The shipped templates turn control strings written in message
    content into control tokens; shardtune keeps them text, so those conversations are compared with shardtune's own
    exported template only (the test above)."""
    training = training_tokenizer(family, tiny_backbone, llama2_backbone)
    shipped = AutoTokenizer.from_pretrained(real_tokenizer_dir({"llama3": "llama3_1", "qwen3": "qwen3"}[family]))
    builder = {"llama3": Llama3ChatPromptBuilder, "qwen3": Qwen3ChatPromptBuilder}[family]
    end_of_turn = training.convert_tokens_to_ids({"llama3": "<|eot_id|>", "qwen3": "<|im_end|>"}[family])
    compared = 0
    for system, turns in CONVERSATIONS:
        texts = [t for turn in turns for t in turn] + ([system] if system is not None else [])
        if any(special in text for text in texts for special in training.all_special_tokens):
            continue
        prompt = builder("x").build(turns, system=system)
        ids, labels = encode_prompt(prompt, training)
        got = shipped.apply_chat_template(messages(system, turns), tokenize=True)
        assert list(got["input_ids"] if hasattr(got, "keys") else got) == ids, (family, system, turns)
        supervised = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
        expected = []
        for answer, (_, content) in zip(prompt.answers(), turns):
            text = answer[: -len(training.convert_ids_to_tokens(end_of_turn))]
            assert text == (content.strip() if family == "llama3" else content.lstrip("\n") if content is turns[-1][1]
                            else content)  # fmt: skip
            expected += training.encode(text, add_special_tokens=False) + [end_of_turn]
        assert supervised == expected, (family, turns)
        compared += 1
    assert compared >= 80


def test_a_qwen3_answer_with_its_own_reasoning_trains_in_thinking_mode(tiny_backbone, llama2_backbone, tmp_path):
    """The template writes a last answer's reasoning inside its think block: training supervises that block with the
    answer (the model writes it), drops earlier answers' reasoning as the template does, and the prefix it was trained
    to continue is the thinking-mode generation prompt (enable_thinking=True)."""
    training = training_tokenizer("qwen3", tiny_backbone, llama2_backbone)
    shipped = AutoTokenizer.from_pretrained(real_tokenizer_dir("qwen3"))
    turns = [("2+2?", "<think>\nadd them\n</think>\n\n4"), ("and 3+3?", "<think>six, surely</think>6")]
    ids, labels = encode_prompt(Qwen3ChatPromptBuilder("x").build(turns), training)
    got = shipped.apply_chat_template(messages(None, turns), tokenize=True)
    assert list(got["input_ids"] if hasattr(got, "keys") else got) == ids
    supervised = training.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX])
    assert supervised == "4<|im_end|><think>\nsix, surely\n</think>\n\n6<|im_end|>"  # turn 1's reasoning dropped
    save_chat_tokenizer(copy.deepcopy(training), Qwen3ChatPromptBuilder, tmp_path)
    served = AutoTokenizer.from_pretrained(tmp_path)
    prefix = served.apply_chat_template(messages(None, turns)[:-1], tokenize=True, add_generation_prompt=True,
                                        enable_thinking=True)  # fmt: skip
    assert list(prefix["input_ids"] if hasattr(prefix, "keys") else prefix) == ids[: trained_prefix_end(labels)]


# Meta's Llama 3.1 Instruct chat template (tokenizer_config.json on the Hub), the part that renders a conversation
# without tools, verbatim but for the tool branches left out.
META_LLAMA31_TEMPLATE = (
    "{{- bos_token }}"
    '{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}'
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    '{%- set messages = messages[1:] %}{%- else %}{%- set system_message = "" %}{%- endif %}'
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}'
    '{{- "Cutting Knowledge Date: December 2023\\n" }}'
    '{{- "Today Date: " + date_string + "\\n\\n" }}'
    "{{- system_message }}"
    '{{- "<|eot_id|>" }}'
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def test_llama31_instruct_ids_equal_metas_hub_template(tiny_backbone, llama2_backbone):
    """The Hub's Llama 3.1/3.2/3.3 Instruct ids: Meta's 3.1 template (its dated system block always first), on the
    released Llama 3 vocabulary; the labels are each answer's stripped content plus `<|eot_id|>`."""
    training = training_tokenizer("llama3", tiny_backbone, llama2_backbone)
    eot = training.convert_tokens_to_ids("<|eot_id|>")
    for system, turns in CONVERSATIONS:
        if any(special in t for turn in turns for t in turn for special in training.all_special_tokens):
            continue
        prompt = Llama31ChatPromptBuilder("x").build(turns, system=system)
        ids, labels = encode_prompt(prompt, training)
        got = training.apply_chat_template(messages(system, turns), chat_template=META_LLAMA31_TEMPLATE, tokenize=True)
        assert list(got["input_ids"] if hasattr(got, "keys") else got) == ids, (system, turns)
        supervised = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
        assert supervised == [t for _, a in turns for t in training.encode(a.strip(), add_special_tokens=False) + [eot]]
