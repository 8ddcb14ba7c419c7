"""Fine-tuning recipes: which parameters train. `full` trains everything; `last-layer` trains exactly the backbone's
`last_layer_finetune_modules` (embed_tokens, the last decoder layer, lm_head) and freezes the rest; `lora` freezes the
model and trains peft LoRA adapters on the chosen linear layers (and, if asked, the embeddings and head)."""

from __future__ import annotations

import logging

from backbones.base import LLMBackbone
from backbones.lora import LoraSettings, apply_lora
from launch.config import Config

log = logging.getLogger(__name__)
STAGES = ("full", "last-layer", "lora")


def lora_settings(config: Config, linear_layer_names: tuple[str, ...], tied_embeddings: bool) -> LoraSettings | None:
    """The LoRA settings of a run (None for the other stages); no target modules means every linear layer of the
    backbone's decoder blocks, as OpenVLA's fine-tuning does."""
    if config.train.stage != "lora":
        return None
    lora = config.lora
    targets = tuple(lora.target_modules) or linear_layer_names
    return LoraSettings(lora.rank, lora.alpha, lora.dropout, targets, lora.train_embeddings, tied_embeddings)


def lora_target_problems(backbone: LLMBackbone, settings: LoraSettings | None) -> list[str]:
    """Target names that match no linear layer of the model's decoder blocks."""
    if settings is None:
        return []
    names = {name.rsplit(".", 1)[-1] for name, module in backbone.llm.named_modules()
             if isinstance(module, backbone.transformer_layer_cls)
             for name, _ in module.named_modules() if name}  # fmt: skip
    unknown = [t for t in settings.target_modules if t not in names]
    if not unknown:
        return []
    return [f"--lora.target_modules contains {', '.join(unknown)}, which the model's decoder blocks lack; choose from "
            f"{', '.join(backbone.linear_layer_names)}"]  # fmt: skip


def apply_stage(backbone: LLMBackbone, stage: str, lora: LoraSettings | None = None) -> tuple[int, int]:
    """Set requires_grad in place (before sharding, so frozen parameters never reach the optimizer); for `lora`,
    inject the adapters first. Returns (trainable, frozen) parameter counts."""
    if stage == "full":
        backbone.llm.requires_grad_(True)
    elif stage == "last-layer":
        backbone.llm.requires_grad_(False)
        for module in backbone.last_layer_finetune_modules:
            module.requires_grad_(True)
    elif stage == "lora":
        backbone.peft_model = apply_lora(backbone.llm, lora)
    else:
        raise ValueError(f"unknown stage '{stage}' (--train.stage); valid stages: {', '.join(STAGES)}")
    trainable = sum(p.numel() for p in backbone.llm.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in backbone.llm.parameters() if not p.requires_grad)
    log.info("stage %s: %s trainable, %s frozen parameters", stage, f"{trainable:,}", f"{frozen:,}")
    return trainable, frozen
