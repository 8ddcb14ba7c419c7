"""Backbone registry: id -> (class, Hub path, context length). Adding a family is one file plus entries here."""

from __future__ import annotations

from dataclasses import dataclass

from backbones.base import HFCausalLLMBackbone, read_hf_token
from backbones.llama2 import LLAMA2_MODELS, LLaMa2LLMBackbone


@dataclass(frozen=True)
class BackboneSpec:
    cls: type[HFCausalLLMBackbone]
    hf_hub_path: str
    llm_max_length: int = 2048
    # Built by shardtune itself (no network): `backbones.tiny.ensure_tiny_model` gives its local directory.
    local_build: bool = False


BACKBONES: dict[str, BackboneSpec] = {
    **{
        backbone_id: BackboneSpec(LLaMa2LLMBackbone, path, local_build=backbone_id.startswith("llama2-tiny"))
        for backbone_id, path in LLAMA2_MODELS.items()
    },
}


def get_backbone_spec(backbone_id: str) -> BackboneSpec:
    if backbone_id not in BACKBONES:
        raise ValueError(f"unknown backbone '{backbone_id}' (--model.backbone); valid ids: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[backbone_id]


def build_backbone(
    backbone_id: str,
    path: str | None = None,
    llm_max_length: int | None = None,
    hf_token_file: str | None = None,
    attn_implementation: str = "sdpa",
    inference_mode: bool = False,
    load_weights: bool = True,
) -> HFCausalLLMBackbone:
    """Instantiate a registered backbone from its Hub path, or from `path` (a local directory) when given."""
    spec = get_backbone_spec(backbone_id)
    if path is None and spec.local_build:
        from backbones.tiny import ensure_tiny_model

        path = str(ensure_tiny_model())
    return spec.cls(
        backbone_id,
        spec.hf_hub_path,
        llm_max_length=llm_max_length or spec.llm_max_length,
        hf_token=None if path else read_hf_token(hf_token_file),
        inference_mode=inference_mode,
        attn_implementation=attn_implementation,
        local_path=path,
        load_weights=load_weights,
    )
