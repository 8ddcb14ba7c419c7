"""LLM backbones: the contract the launcher reads, the LLaMA-2 family, prompt formats and the offline tiny model."""

from backbones.base import HFCausalLLMBackbone, LLMBackbone
from backbones.llama2 import LLaMa2LLMBackbone
from backbones.registry import BACKBONES, build_backbone, get_backbone_spec

__all__ = [
    "BACKBONES",
    "HFCausalLLMBackbone",
    "LLMBackbone",
    "LLaMa2LLMBackbone",
    "build_backbone",
    "get_backbone_spec",
]
