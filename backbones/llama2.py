"""LLaMA-2 family (pure, chat, Vicuna v1.5, and the offline tiny model): what trains in the last-layer recipe, and one
registry row per id (class, Hub path, prompt format, context, published shape)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from backbones.base import BackboneSpec, HFCausalLLMBackbone
from backbones.prompting import LLaMa2ChatPromptBuilder, PurePromptBuilder, VicunaV15PromptBuilder
from backbones.tiny import TINY_CONFIG, ensure_tiny_model


class LLaMa2LLMBackbone(HFCausalLLMBackbone):
    transformer_layer_cls = LlamaDecoderLayer
    linear_layer_names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def extend_tokenizer(self) -> None:
        # LLaMA-2 ships without a pad token; a dedicated one keeps padding distinct from EOS (which is supervised).
        if self.tokenizer.pad_token is None:
            self.tokenizer.add_special_tokens({"pad_token": "<PAD>"})

    @classmethod
    def last_layer_modules(cls, llm) -> Sequence[nn.Module]:
        return (llm.model.embed_tokens, llm.model.layers[-1], llm.lm_head)


# The published config.json values (Hub, 2023): enough to build each model on `meta` and plan it with no network.
LLAMA2_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)
LLAMA2_13B = dict(
    hidden_size=5120,
    intermediate_size=13824,
    num_hidden_layers=40,
    num_attention_heads=40,
    num_key_value_heads=40,
    vocab_size=32000,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)
TINY = {**TINY_CONFIG, "vocab_size": 1024}


def _row(hub_path: str, builder, shape: dict, context: int = 4096, local: bool = False) -> BackboneSpec:
    return BackboneSpec(
        LLaMa2LLMBackbone,
        hub_path,
        builder,
        context,
        {"model_type": "llama", **shape},
        local_build=ensure_tiny_model if local else None,
        added_tokens=1,
    )  # + <PAD>


# One row per id (as prismatic's LLAMA2_MODELS): the row is the registration. LLaMA-2 and Vicuna v1.5 were trained at
# a 4096-token context; the tiny model is built here (backbones.tiny) and needs no Hub path.
# fmt: off
LLAMA2_MODELS: dict[str, BackboneSpec] = {
    "llama2-7b-pure":   _row("meta-llama/Llama-2-7b-hf",       PurePromptBuilder,       LLAMA2_7B),
    "llama2-13b-pure":  _row("meta-llama/Llama-2-13b-hf",      PurePromptBuilder,       LLAMA2_13B),
    "llama2-7b-chat":   _row("meta-llama/Llama-2-7b-chat-hf",  LLaMa2ChatPromptBuilder, LLAMA2_7B),
    "llama2-13b-chat":  _row("meta-llama/Llama-2-13b-chat-hf", LLaMa2ChatPromptBuilder, LLAMA2_13B),
    "vicuna-v15-7b":    _row("lmsys/vicuna-7b-v1.5",           VicunaV15PromptBuilder,  LLAMA2_7B),
    "vicuna-v15-13b":   _row("lmsys/vicuna-13b-v1.5",          VicunaV15PromptBuilder,  LLAMA2_13B),
    "llama2-tiny-pure": _row("shardtune/llama2-tiny",          PurePromptBuilder,       TINY, 2048, local=True),
    "llama2-tiny-chat": _row("shardtune/llama2-tiny",          LLaMa2ChatPromptBuilder, TINY, 2048, local=True),
}
# fmt: on
