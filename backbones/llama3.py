"""Llama 3.x: 3.1 8B and 70B, 3.2 1B and 3B (tied embeddings), 3.3 70B, and a tiny offline Llama 3 on the released
tokenizer. The same LlamaDecoderLayer as LLaMA-2; grouped-query attention (8 key/value heads), a 128k vocabulary with
its own pad token (no new row), llama3 RoPE scaling and a 128k context. Instruct ids use Meta's 3.1 chat template
(headers, a dated system block, answers ended by `<|eot_id|>`); the tiny model the template of the released tokenizer
it is built on (the same headers without the system block); base ids the Pure format ended by `<|end_of_text|>`."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from backbones.base import BackboneSpec, HFCausalLLMBackbone
from backbones.prompting import Prompt, PromptBuilder, PurePromptBuilder
from backbones.real_tokenizers import real_tokenizer_dir
from backbones.tiny import ensure_built

BEGIN, HEADER, END_HEADER, EOT = "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
PAD_ID = 128004


class Llama3LLMBackbone(HFCausalLLMBackbone):
    transformer_layer_cls = LlamaDecoderLayer
    linear_layer_names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    end_of_turn_token = EOT

    def extend_tokenizer(self) -> None:
        # Llama 3 reserves id 128004 for padding (3.1 names it <|finetune_right_pad_id|>, 3.0 and the released
        # tokenizer the tests use <|reserved_special_token_2|>): padding never needs a new embedding row.
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.convert_ids_to_tokens(PAD_ID)

    @classmethod
    def last_layer_modules(cls, llm) -> Sequence[nn.Module]:
        # With tied embeddings (3.2 1B/3B) lm_head's weight is embed_tokens': the one matrix trains, once.
        return (llm.model.embed_tokens, llm.model.layers[-1], llm.lm_head)


class Llama3ChatPromptBuilder(PromptBuilder):
    """The released Llama 3 tokenizer's chat template: `<|begin_of_text|>`, then every message as
    `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content, stripped}<|eot_id|>` (a system message first, when
    there is one). An answer's span is its stripped content and the `<|eot_id|>` after it; a generation prompt ends
    with the assistant header and its `\\n\\n`."""

    chat_template = (
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + esc(message['content'] | trim)"
        " + '<|eot_id|>' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
    )

    def add_turn(self, prompt: Prompt, index: int, user: str, answer: str, system: str | None) -> None:
        if index == 0:
            prompt.add_special(BEGIN)
            if system is not None:
                self.message(prompt, "system", system)
        self.message(prompt, "user", user)
        prompt.add_special(HEADER)
        prompt.add_text("assistant")
        prompt.add_special(END_HEADER)
        prompt.add_text("\n\n", answer.strip())
        prompt.add_special(EOT, supervised=True)

    @staticmethod
    def message(prompt: Prompt, role: str, content: str) -> None:
        prompt.add_special(HEADER)
        prompt.add_text(role)
        prompt.add_special(END_HEADER)
        prompt.add_text("\n\n" + content.strip())
        prompt.add_special(EOT)


class Llama31ChatPromptBuilder(Llama3ChatPromptBuilder):
    """Meta's Llama 3.1 chat template (3.1, 3.2 and 3.3 Instruct on the Hub), for conversations without tools: the
    same headers, with a system block always first, `Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n`
    and the stripped system message (empty without one). The date is the 3.1 template's own default, 26 Jul 2024, for
    3.2 too, whose template writes the day it runs: training text must not depend on the day it was tokenized
    (pass `date_string` to apply_chat_template to serve another)."""

    HEADER_TEXT = "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
    chat_template = (
        "{%- if date_string is not defined -%}{%- set date_string = '26 Jul 2024' -%}{%- endif -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] | trim -%}"
        "{%- set turns = messages[1:] -%}{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
        "{{- bos_token + '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\n'"
        " + 'Today Date: ' + date_string + '\\n\\n' + esc(system) + '<|eot_id|>' -}}"
        "{%- for message in turns -%}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + esc(message['content'] | trim)"
        " + '<|eot_id|>' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
    )

    def add_turn(self, prompt: Prompt, index: int, user: str, answer: str, system: str | None) -> None:
        if index == 0:
            prompt.add_special(BEGIN)
            prompt.add_special(HEADER)
            prompt.add_text("system")
            prompt.add_special(END_HEADER)
            prompt.add_text("\n\n" + self.HEADER_TEXT.format(date="26 Jul 2024") + (system or "").strip())
            prompt.add_special(EOT)
        super().add_turn(prompt, index + 1, user, answer, None)


# The published config.json values (Hub): enough to build each model on `meta` and plan it with no network.
ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}  # fmt: skip
COMMON = dict(vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
              num_key_value_heads=8, bos_token_id=128000)  # fmt: skip
LLAMA31_8B = dict(COMMON, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  rope_scaling={**ROPE, "factor": 8.0}, tie_word_embeddings=False)  # fmt: skip
LLAMA31_70B = dict(COMMON, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                   rope_scaling={**ROPE, "factor": 8.0}, tie_word_embeddings=False)  # fmt: skip
LLAMA32_1B = dict(COMMON, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                  head_dim=64, rope_scaling={**ROPE, "factor": 32.0}, tie_word_embeddings=True)  # fmt: skip
LLAMA32_3B = dict(COMMON, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                  head_dim=128, rope_scaling={**ROPE, "factor": 32.0}, tie_word_embeddings=True)  # fmt: skip
# The tiny model: Llama 3's vocabulary and RoPE at a small width (the embedding and head rows make it 8M parameters).
TINY = dict(COMMON, hidden_size=32, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, rope_scaling={**ROPE, "factor": 8.0},
            tie_word_embeddings=False, eos_token_id=[128001, 128008, 128009], initializer_range=0.02)  # fmt: skip
TINY_VERSION = "v2"


def save_tiny(out: Path) -> None:
    source = real_tokenizer_dir("llama3_1")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, out / name)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    model.generation_config = GenerationConfig(bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
                                               do_sample=False)  # fmt: skip
    model.save_pretrained(out)


def ensure_tiny() -> Path:
    return ensure_built(f"llama3-tiny-{TINY_VERSION}", save_tiny)


def _row(hub_path: str, builder: type[PromptBuilder], shape: dict, context: int = 131072, local: bool = False):
    return BackboneSpec(Llama3LLMBackbone, hub_path, builder, context, {"model_type": "llama", **shape},
                        local_build=ensure_tiny if local else None)  # fmt: skip


# One row per id; base ids train the Pure format, instruct ids Meta's 3.1 chat template, the tiny model the template of
# the released tokenizer it is built on (Llama 3's, without the dated system block).
# fmt: off
LLAMA3_MODELS: dict[str, BackboneSpec] = {
    "llama3.1-8b":           _row("meta-llama/Llama-3.1-8B",           PurePromptBuilder,       LLAMA31_8B),
    "llama3.1-8b-instruct":  _row("meta-llama/Llama-3.1-8B-Instruct",  Llama31ChatPromptBuilder, LLAMA31_8B),
    "llama3.1-70b-instruct": _row("meta-llama/Llama-3.1-70B-Instruct", Llama31ChatPromptBuilder, LLAMA31_70B),
    "llama3.2-1b":           _row("meta-llama/Llama-3.2-1B",           PurePromptBuilder,       LLAMA32_1B),
    "llama3.2-1b-instruct":  _row("meta-llama/Llama-3.2-1B-Instruct",  Llama31ChatPromptBuilder, LLAMA32_1B),
    "llama3.2-3b":           _row("meta-llama/Llama-3.2-3B",           PurePromptBuilder,       LLAMA32_3B),
    "llama3.2-3b-instruct":  _row("meta-llama/Llama-3.2-3B-Instruct",  Llama31ChatPromptBuilder, LLAMA32_3B),
    "llama3.3-70b-instruct": _row("meta-llama/Llama-3.3-70B-Instruct", Llama31ChatPromptBuilder, LLAMA31_70B),
    "llama3-tiny-instruct":  _row("shardtune/llama3-tiny",             Llama3ChatPromptBuilder, TINY, 8192, local=True),
}
# fmt: on
