"""Qwen3 dense models (0.6B to 32B, base and post-trained) and a tiny offline Qwen3 on the released tokenizer, tied as
Qwen3-0.6B/1.7B/4B are. Qwen3DecoderLayer with q/k norms; grouped-query attention (8 key/value heads), a 152k
vocabulary whose pad token is `<|endoftext|>` (no new row), no BOS, and a 32k native context.

Post-trained ids use the released tokenizer's chat template (ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n`).
That template writes an empty `<think>\\n\\n</think>\\n\\n` into the last assistant turn: training keeps it there, as
part of the prompt (not supervised), which is Qwen3's non-thinking mode, and the exported template's generation prompt
ends with the same empty block unless `enable_thinking=True` is passed. An answer that brings its own reasoning
(`<think>...</think>` in its content) is trained in thinking mode: the block, as the template writes it, is
supervised. Base ids use the Pure format ended by the tokenizer's EOS.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

from backbones.base import BackboneSpec, HFCausalLLMBackbone
from backbones.prompting import Prompt, PromptBuilder, PurePromptBuilder
from backbones.real_tokenizers import real_tokenizer_dir
from backbones.tiny import ensure_built

START, END = "<|im_start|>", "<|im_end|>"


class Qwen3LLMBackbone(HFCausalLLMBackbone):
    transformer_layer_cls = Qwen3DecoderLayer
    linear_layer_names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    end_of_turn_token = END

    @classmethod
    def last_layer_modules(cls, llm) -> Sequence[nn.Module]:
        # Tied (0.6B/1.7B/4B): lm_head's weight is embed_tokens', so the one matrix trains, once.
        return (llm.model.embed_tokens, llm.model.layers[-1], llm.lm_head)


def split_reasoning(content: str) -> tuple[str, str]:
    """(reasoning, answer) as Qwen3's template splits an assistant message at `</think>`."""
    if "</think>" not in content:
        return "", content
    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return reasoning, content.split("</think>")[-1].lstrip("\n")


class Qwen3ChatPromptBuilder(PromptBuilder):
    """Qwen3's chat template for conversations without tools: an optional `<|im_start|>system\\n...<|im_end|>\\n`,
    then `<|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>\\n` per turn, contents as
    they are; the last answer is written `<think>\\n{reasoning}\\n</think>\\n\\n{answer}` (reasoning empty unless
    the answer brings it), earlier answers without their reasoning."""

    chat_template = (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{{- '<|im_start|>system\\n' + esc(messages[0]['content']) + '<|im_end|>\\n' -}}{%- endif -%}"
        "{%- set ns = namespace(last_query=-1) -%}"
        "{%- for message in messages -%}{%- if message['role'] == 'user' -%}{%- set ns.last_query = loop.index0 -%}"
        "{%- endif -%}{%- endfor -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' or (message['role'] == 'system' and not loop.first) -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + esc(message['content']) + '<|im_end|>\\n' -}}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{%- set content = message['content'] -%}{%- set reasoning = '' -%}"
        "{%- if '</think>' in content -%}"
        "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') -%}"
        "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}{%- endif -%}"
        "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) -%}"
        "{{- '<|im_start|>assistant\\n<think>\\n' + esc(reasoning.strip('\\n')) + '\\n</think>\\n\\n'"
        " + esc(content.lstrip('\\n')) -}}"
        "{%- else -%}{{- '<|im_start|>assistant\\n' + esc(content) -}}{%- endif -%}"
        "{{- '<|im_end|>\\n' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
        "{%- if enable_thinking is not defined or not enable_thinking -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
        "{%- endif -%}{%- endif -%}"
    )

    def build(self, turns: Sequence[tuple[str, str]], system: str | None = None) -> Prompt:
        if not turns:
            raise ValueError("a conversation needs at least one (user, assistant) turn")
        prompt = Prompt()
        if system is not None:
            self.message(prompt, "system", system)
        for index, (user, answer) in enumerate(turns):
            self.message(prompt, "user", user)
            reasoning, answer = split_reasoning(answer)
            prompt.add_special(START)
            if index == len(turns) - 1:  # the template's think block
                block = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n"
                if reasoning:  # thinking mode: the block is the model's to write
                    prompt.add_text("assistant\n", block + answer.lstrip("\n"))
                else:  # non-thinking mode: the empty block belongs to the prompt
                    prompt.add_text("assistant\n" + block, answer.lstrip("\n"))
            else:
                prompt.add_text("assistant\n", answer)
            prompt.add_special(END, supervised=True)
            prompt.add_text("\n")
        return prompt

    @staticmethod
    def message(prompt: Prompt, role: str, content: str) -> None:
        prompt.add_special(START)
        prompt.add_text(f"{role}\n{content}")
        prompt.add_special(END)
        prompt.add_text("\n")


# The published config.json values (Hub): enough to build each model on `meta` and plan it with no network.
COMMON = dict(vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
              num_key_value_heads=8, head_dim=128, bos_token_id=151643, eos_token_id=151645)  # fmt: skip
QWEN3_06B = dict(COMMON, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 tie_word_embeddings=True)  # fmt: skip
QWEN3_17B = dict(COMMON, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                 tie_word_embeddings=True)  # fmt: skip
QWEN3_4B = dict(COMMON, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                tie_word_embeddings=True)  # fmt: skip
QWEN3_8B = dict(COMMON, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                tie_word_embeddings=False)  # fmt: skip
QWEN3_14B = dict(COMMON, hidden_size=5120, intermediate_size=17408, num_hidden_layers=40, num_attention_heads=40,
                 tie_word_embeddings=False)  # fmt: skip
QWEN3_32B = dict(COMMON, hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
                 tie_word_embeddings=False)  # fmt: skip
BASE = dict(max_position_embeddings=32768, eos_token_id=151643)  # the base releases' own context and EOS
# The tiny model: Qwen3's vocabulary at a small width, tied (the shared embedding makes it 5M parameters).
TINY = dict(COMMON, hidden_size=32, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=8192, tie_word_embeddings=True,
            initializer_range=0.02)  # fmt: skip
TINY_VERSION = "v2"


def save_tiny(out: Path) -> None:
    source = real_tokenizer_dir("qwen3")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, out / name)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**TINY))
    model.generation_config = GenerationConfig(eos_token_id=[151645, 151643], pad_token_id=151643, do_sample=False)
    model.save_pretrained(out)


def ensure_tiny() -> Path:
    return ensure_built(f"qwen3-tiny-{TINY_VERSION}", save_tiny)


def _row(hub_path: str, builder: type[PromptBuilder], shape: dict, context: int = 32768, local: bool = False):
    return BackboneSpec(Qwen3LLMBackbone, hub_path, builder, context, {"model_type": "qwen3", **shape},
                        local_build=ensure_tiny if local else None)  # fmt: skip


# One row per id, named as the Hub names them: `-Base` ids train the Pure format, the post-trained ids the chat
# template's. Qwen3-32B has no base release.
# fmt: off
QWEN3_MODELS: dict[str, BackboneSpec] = {
    "qwen3-0.6b-base": _row("Qwen/Qwen3-0.6B-Base", PurePromptBuilder,      {**QWEN3_06B, **BASE}),
    "qwen3-0.6b":      _row("Qwen/Qwen3-0.6B",      Qwen3ChatPromptBuilder, QWEN3_06B),
    "qwen3-1.7b-base": _row("Qwen/Qwen3-1.7B-Base", PurePromptBuilder,      {**QWEN3_17B, **BASE}),
    "qwen3-1.7b":      _row("Qwen/Qwen3-1.7B",      Qwen3ChatPromptBuilder, QWEN3_17B),
    "qwen3-4b-base":   _row("Qwen/Qwen3-4B-Base",   PurePromptBuilder,      {**QWEN3_4B, **BASE}),
    "qwen3-4b":        _row("Qwen/Qwen3-4B",        Qwen3ChatPromptBuilder, QWEN3_4B),
    "qwen3-8b-base":   _row("Qwen/Qwen3-8B-Base",   PurePromptBuilder,      {**QWEN3_8B, **BASE}),
    "qwen3-8b":        _row("Qwen/Qwen3-8B",        Qwen3ChatPromptBuilder, QWEN3_8B),
    "qwen3-14b-base":  _row("Qwen/Qwen3-14B-Base",  PurePromptBuilder,      {**QWEN3_14B, **BASE}),
    "qwen3-14b":       _row("Qwen/Qwen3-14B",       Qwen3ChatPromptBuilder, QWEN3_14B),
    "qwen3-32b":       _row("Qwen/Qwen3-32B",       Qwen3ChatPromptBuilder, QWEN3_32B),
    "qwen3-tiny":      _row("shardtune/qwen3-tiny", Qwen3ChatPromptBuilder, TINY, 8192, local=True),
}
# fmt: on
