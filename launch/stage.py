"""Fine-tuning recipes: which parameters train. `full` trains everything; `last-layer` trains exactly the backbone's
`last_layer_finetune_modules` (embed_tokens, the last decoder layer, lm_head) and freezes the rest."""

from __future__ import annotations

import logging

from backbones.base import LLMBackbone

log = logging.getLogger(__name__)


def apply_stage(backbone: LLMBackbone, stage: str) -> tuple[int, int]:
    """Set requires_grad in place (before sharding, so frozen parameters never reach the optimizer).
    Returns (trainable, frozen) parameter counts."""
    if stage == "full":
        backbone.llm.requires_grad_(True)
    elif stage == "last-layer":
        backbone.llm.requires_grad_(False)
        for module in backbone.last_layer_finetune_modules:
            module.requires_grad_(True)
    else:
        raise ValueError(f"unknown stage '{stage}' (--train.stage); valid stages: full, last-layer")
    trainable = sum(p.numel() for p in backbone.llm.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in backbone.llm.parameters() if not p.requires_grad)
    log.info("stage %s: %s trainable, %s frozen parameters", stage, f"{trainable:,}", f"{frozen:,}")
    return trainable, frozen
