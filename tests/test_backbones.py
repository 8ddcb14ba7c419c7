"""Registry, backbone contract, and the offline tiny model."""

from __future__ import annotations

import hashlib

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from backbones import BACKBONES, LLaMa2LLMBackbone, build_backbone, get_backbone_spec
from backbones.prompting import LLaMa2ChatPromptBuilder, PurePromptBuilder, VicunaV15PromptBuilder
from backbones.tiny import save_tiny

EXPECTED = {
    "llama2-7b-pure": ("meta-llama/Llama-2-7b-hf", PurePromptBuilder),
    "llama2-13b-pure": ("meta-llama/Llama-2-13b-hf", PurePromptBuilder),
    "llama2-7b-chat": ("meta-llama/Llama-2-7b-chat-hf", LLaMa2ChatPromptBuilder),
    "llama2-13b-chat": ("meta-llama/Llama-2-13b-chat-hf", LLaMa2ChatPromptBuilder),
    "vicuna-v15-7b": ("lmsys/vicuna-7b-v1.5", VicunaV15PromptBuilder),
    "vicuna-v15-13b": ("lmsys/vicuna-13b-v1.5", VicunaV15PromptBuilder),
    "llama2-tiny-pure": ("shardtune/llama2-tiny", PurePromptBuilder),
    "llama2-tiny-chat": ("shardtune/llama2-tiny", LLaMa2ChatPromptBuilder),
}


@pytest.mark.parametrize("backbone_id", sorted(EXPECTED))
def test_every_registry_id_resolves_to_class_hub_path_and_prompt_builder(backbone_id, tiny_dir):
    spec = get_backbone_spec(backbone_id)
    hub_path, builder_cls = EXPECTED[backbone_id]
    assert spec.cls is LLaMa2LLMBackbone and spec.hf_hub_path == hub_path
    # The same class, loaded from a local directory (no network): the prompt builder follows the id.
    backbone = build_backbone(backbone_id, path=str(tiny_dir), load_weights=False)
    assert backbone.prompt_builder_fn is builder_cls
    assert backbone.half_precision_dtype is torch.bfloat16
    assert backbone.transformer_layer_cls.__name__ == "LlamaDecoderLayer"


def test_registry_covers_exactly_the_documented_ids():
    assert set(BACKBONES) == set(EXPECTED)


def test_unknown_backbone_error_lists_valid_ids():
    with pytest.raises(ValueError) as error:
        get_backbone_spec("llama3-8b")
    assert "llama3-8b" in str(error.value) and all(i in str(error.value) for i in EXPECTED)


def test_tiny_backbone_pads_vocab_to_64_and_sets_pad_id(tiny_backbone):
    tok, llm = tiny_backbone.tokenizer, tiny_backbone.llm
    assert tok.pad_token == "<PAD>" and tok.pad_token_id == len(tok) - 1
    assert llm.config.pad_token_id == tok.pad_token_id
    assert llm.config.vocab_size % 64 == 0 and llm.config.vocab_size >= len(tok)
    assert llm.get_input_embeddings().weight.shape[0] == llm.config.vocab_size
    assert llm.get_output_embeddings().weight.shape[0] == llm.config.vocab_size
    assert [m for m in tiny_backbone.last_layer_finetune_modules] == [
        llm.model.embed_tokens,
        llm.model.layers[-1],
        llm.lm_head,
    ]
    assert tiny_backbone.embed_dim == llm.config.hidden_size


def test_tiny_directory_loads_with_plain_from_pretrained(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert model.config.model_type == "llama" and model.config.num_key_value_heads < model.config.num_attention_heads
    assert tokenizer.convert_tokens_to_ids(["<unk>", "<s>", "</s>"]) == [0, 1, 2]
    # Byte fallback: characters outside the tiny vocabulary survive a round trip.
    text = "Zürich → 東京"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text


def test_meta_build_has_the_same_shapes_as_the_loaded_model(tiny_backbone, tiny_dir):
    meta = build_backbone("llama2-tiny-chat", load_weights=False)
    loaded = {k: v.shape for k, v in tiny_backbone.llm.state_dict().items()}
    assert {k: v.shape for k, v in meta.llm.state_dict().items()} == loaded
    assert all(p.is_meta for p in meta.llm.parameters())


def test_building_the_tiny_model_twice_gives_identical_bytes(tmp_path):
    digests = []
    for name in ("a", "b"):
        save_tiny(tmp_path / name)
        digests.append(
            {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((tmp_path / name).iterdir())}
        )
    assert digests[0] == digests[1] and "model.safetensors" in digests[0] and "tokenizer.json" in digests[0]


def test_missing_local_model_says_how_to_supply_a_token_or_path(tmp_path):
    with pytest.raises(OSError, match="HF_TOKEN.*--model.path"):
        build_backbone("llama2-7b-chat", path=str(tmp_path / "missing"))
