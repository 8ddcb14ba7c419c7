"""Backbone registry: every family's rows in one table (id -> BackboneSpec). Adding a family is one file whose rows are
merged here."""

from __future__ import annotations

from backbones.base import BackboneSpec, HFCausalLLMBackbone
from backbones.llama2 import LLAMA2_MODELS
from backbones.llama3 import LLAMA3_MODELS
from backbones.prompting import PromptBuilder
from backbones.qwen3 import QWEN3_MODELS

BACKBONES: dict[str, BackboneSpec] = {**LLAMA2_MODELS, **LLAMA3_MODELS, **QWEN3_MODELS}


def get_backbone_spec(backbone_id: str) -> BackboneSpec:
    if backbone_id not in BACKBONES:
        raise ValueError(
            f"unknown backbone '{backbone_id}' (--model.backbone); valid ids: {', '.join(sorted(BACKBONES))}"
        )
    return BACKBONES[backbone_id]


def prompt_builder_of(backbone_id: str) -> PromptBuilder:
    """The prompt builder of a registered id, without loading a model (evaluation and generation scripts)."""
    return get_backbone_spec(backbone_id).prompt_builder(backbone_id)


def build_backbone(
    backbone_id: str,
    path: str | None = None,
    hf_token_file: str | None = None,
    attn_implementation: str = "sdpa",
    inference_mode: bool = False,
    load_weights: bool = True,
) -> HFCausalLLMBackbone:
    """Instantiate a registered backbone from its Hub path, or from `path` (a local directory) when given."""
    spec = get_backbone_spec(backbone_id)
    if path is None and spec.local_build is not None:
        path = str(spec.local_build())
    return spec.cls(
        backbone_id,
        spec,
        hf_token_file=hf_token_file,
        inference_mode=inference_mode,
        attn_implementation=attn_implementation,
        local_path=path,
        load_weights=load_weights,
    )
