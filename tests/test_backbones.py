"""Registry, backbone contract, and the offline tiny model."""

from __future__ import annotations

import hashlib

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from backbones import BACKBONES, LLaMa2LLMBackbone, build_backbone, get_backbone_spec
from backbones.llama3 import Llama3ChatPromptBuilder, Llama3LLMBackbone, Llama31ChatPromptBuilder
from backbones.prompting import LLaMa2ChatPromptBuilder, PurePromptBuilder, VicunaV15PromptBuilder
from backbones.qwen3 import Qwen3ChatPromptBuilder, Qwen3LLMBackbone
from backbones.tiny import save_tiny

# id -> (family class, Hub path, prompt builder, the tiny model to build it from offline)
# fmt: off
EXPECTED = {
    "llama2-7b-pure":        (LLaMa2LLMBackbone, "meta-llama/Llama-2-7b-hf",          PurePromptBuilder),
    "llama2-13b-pure":       (LLaMa2LLMBackbone, "meta-llama/Llama-2-13b-hf",         PurePromptBuilder),
    "llama2-7b-chat":        (LLaMa2LLMBackbone, "meta-llama/Llama-2-7b-chat-hf",     LLaMa2ChatPromptBuilder),
    "llama2-13b-chat":       (LLaMa2LLMBackbone, "meta-llama/Llama-2-13b-chat-hf",    LLaMa2ChatPromptBuilder),
    "vicuna-v15-7b":         (LLaMa2LLMBackbone, "lmsys/vicuna-7b-v1.5",              VicunaV15PromptBuilder),
    "vicuna-v15-13b":        (LLaMa2LLMBackbone, "lmsys/vicuna-13b-v1.5",             VicunaV15PromptBuilder),
    "llama2-tiny-pure":      (LLaMa2LLMBackbone, "shardtune/llama2-tiny",             PurePromptBuilder),
    "llama2-tiny-chat":      (LLaMa2LLMBackbone, "shardtune/llama2-tiny",             LLaMa2ChatPromptBuilder),
    "llama3.1-8b":           (Llama3LLMBackbone, "meta-llama/Llama-3.1-8B",           PurePromptBuilder),
    "llama3.1-8b-instruct":  (Llama3LLMBackbone, "meta-llama/Llama-3.1-8B-Instruct",  Llama31ChatPromptBuilder),
    "llama3.1-70b-instruct": (Llama3LLMBackbone, "meta-llama/Llama-3.1-70B-Instruct", Llama31ChatPromptBuilder),
    "llama3.2-1b":           (Llama3LLMBackbone, "meta-llama/Llama-3.2-1B",           PurePromptBuilder),
    "llama3.2-1b-instruct":  (Llama3LLMBackbone, "meta-llama/Llama-3.2-1B-Instruct",  Llama31ChatPromptBuilder),
    "llama3.2-3b":           (Llama3LLMBackbone, "meta-llama/Llama-3.2-3B",           PurePromptBuilder),
    "llama3.2-3b-instruct":  (Llama3LLMBackbone, "meta-llama/Llama-3.2-3B-Instruct",  Llama31ChatPromptBuilder),
    "llama3.3-70b-instruct": (Llama3LLMBackbone, "meta-llama/Llama-3.3-70B-Instruct", Llama31ChatPromptBuilder),
    "llama3-tiny-instruct":  (Llama3LLMBackbone, "shardtune/llama3-tiny",             Llama3ChatPromptBuilder),
    **{f"qwen3-{size}{kind}": (Qwen3LLMBackbone, f"Qwen/Qwen3-{size.upper()}{'-Base' if kind else ''}",
                                PurePromptBuilder if kind else Qwen3ChatPromptBuilder)
       for size in ("0.6b", "1.7b", "4b", "8b", "14b", "32b") for kind in ("", "-base")
       if (size, kind) != ("32b", "-base")},  # Qwen3-32B has no base release
    "qwen3-tiny":            (Qwen3LLMBackbone,  "shardtune/qwen3-tiny",              Qwen3ChatPromptBuilder),
}
# fmt: on
TINY_OF = {
    LLaMa2LLMBackbone: "llama2-tiny-chat",
    Llama3LLMBackbone: "llama3-tiny-instruct",
    Qwen3LLMBackbone: "qwen3-tiny",
}  # fmt: skip


@pytest.mark.parametrize("backbone_id", sorted(EXPECTED))
def test_every_registry_id_resolves_to_class_hub_path_and_prompt_builder(backbone_id):
    spec = get_backbone_spec(backbone_id)
    cls, hub_path, builder_cls = EXPECTED[backbone_id]
    assert spec.cls is cls and spec.hf_hub_path == hub_path and spec.prompt_builder is builder_cls


# One id per (family, prompt format): built from its family's tiny directory (no network), the builder follows the id.
BUILT = sorted({(cls, builder): backbone_id for backbone_id, (cls, _, builder) in EXPECTED.items()}.values())


@pytest.mark.parametrize("backbone_id", BUILT)
def test_each_family_and_format_builds_offline_with_its_layer_class(backbone_id):
    cls, _, builder_cls = EXPECTED[backbone_id]
    spec = get_backbone_spec(backbone_id)
    backbone = build_backbone(backbone_id, path=str(get_backbone_spec(TINY_OF[cls]).local_build()), load_weights=False)
    assert backbone.prompt_builder_fn is builder_cls and backbone.half_precision_dtype is torch.bfloat16
    layer = {LLaMa2LLMBackbone: "LlamaDecoderLayer", Llama3LLMBackbone: "LlamaDecoderLayer",
             Qwen3LLMBackbone: "Qwen3DecoderLayer"}[cls]  # fmt: skip
    assert backbone.transformer_layer_cls.__name__ == layer
    assert spec.config["vocab_size"] >= len(backbone.tokenizer) - spec.added_tokens


def test_registry_covers_exactly_the_documented_ids():
    assert set(BACKBONES) == set(EXPECTED)


def test_new_families_pad_with_their_own_token_and_tie_as_published():
    llama3, qwen3 = build_backbone("llama3-tiny-instruct", load_weights=False), build_backbone("qwen3-tiny")
    assert llama3.tokenizer.pad_token_id == 128004 and len(llama3.tokenizer) == llama3.llm.config.vocab_size == 128256
    assert qwen3.tokenizer.pad_token == "<|endoftext|>" and qwen3.llm.config.vocab_size == 151936  # no new row
    assert not llama3.tied_embeddings and qwen3.tied_embeddings  # the loaded Qwen3 stays tied (to_empty breaks ties)
    assert (llama3.end_of_turn_token, qwen3.end_of_turn_token) == ("<|eot_id|>", "<|im_end|>")
    for spec in (get_backbone_spec(i) for i in ("llama3.2-1b", "llama3.2-3b-instruct", "qwen3-0.6b", "qwen3-4b-base")):
        assert spec.config["tie_word_embeddings"], spec.hf_hub_path
    for spec in (get_backbone_spec(i) for i in ("llama3.1-8b", "llama3.1-70b-instruct", "qwen3-8b", "qwen3-32b")):
        assert not spec.config["tie_word_embeddings"], spec.hf_hub_path


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
