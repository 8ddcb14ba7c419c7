"""LLaMA-2 family (pure, chat, Vicuna v1.5, and the offline tiny model): hub paths, prompt formats, and what trains
in the last-layer recipe."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from backbones.base import HFCausalLLMBackbone
from backbones.prompting import LLaMa2ChatPromptBuilder, PromptBuilder, PurePromptBuilder, VicunaV15PromptBuilder

# id -> Hub path (as in OpenVLA's prismatic/models/backbones/llm/llama2.py); the tiny ones are built locally.
LLAMA2_MODELS: dict[str, str] = {
    "llama2-7b-pure": "meta-llama/Llama-2-7b-hf",
    "llama2-13b-pure": "meta-llama/Llama-2-13b-hf",
    "llama2-7b-chat": "meta-llama/Llama-2-7b-chat-hf",
    "llama2-13b-chat": "meta-llama/Llama-2-13b-chat-hf",
    "vicuna-v15-7b": "lmsys/vicuna-7b-v1.5",
    "vicuna-v15-13b": "lmsys/vicuna-13b-v1.5",
    "llama2-tiny-pure": "shardtune/llama2-tiny",
    "llama2-tiny-chat": "shardtune/llama2-tiny",
}

PROMPT_BUILDERS: dict[str, type[PromptBuilder]] = {
    "llama2-7b-pure": PurePromptBuilder,
    "llama2-13b-pure": PurePromptBuilder,
    "llama2-tiny-pure": PurePromptBuilder,
    "llama2-7b-chat": LLaMa2ChatPromptBuilder,
    "llama2-13b-chat": LLaMa2ChatPromptBuilder,
    "llama2-tiny-chat": LLaMa2ChatPromptBuilder,
    "vicuna-v15-7b": VicunaV15PromptBuilder,
    "vicuna-v15-13b": VicunaV15PromptBuilder,
}


class LLaMa2LLMBackbone(HFCausalLLMBackbone):
    def extend_tokenizer(self) -> None:
        # LLaMA-2 ships without a pad token; a dedicated one keeps padding distinct from EOS (which is supervised).
        if self.tokenizer.pad_token is None:
            self.tokenizer.add_special_tokens({"pad_token": "<PAD>"})

    @property
    def prompt_builder_fn(self) -> Callable[[str], PromptBuilder]:
        if self.identifier not in PROMPT_BUILDERS:
            raise ValueError(f"no prompt builder for backbone '{self.identifier}'; valid ids: {sorted(PROMPT_BUILDERS)}")
        return PROMPT_BUILDERS[self.identifier]

    @staticmethod
    def prompt_builder_of(identifier: str) -> PromptBuilder:
        """The prompt builder of a registered id, without loading a model (evaluation and generation scripts)."""
        return PROMPT_BUILDERS[identifier](identifier)

    @property
    def transformer_layer_cls(self) -> type[nn.Module]:
        return LlamaDecoderLayer

    @property
    def half_precision_dtype(self) -> torch.dtype:
        return torch.bfloat16

    @property
    def last_layer_finetune_modules(self) -> Sequence[nn.Module]:
        return (self.llm.model.embed_tokens, self.llm.model.layers[-1], self.llm.lm_head)
