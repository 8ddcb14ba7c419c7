"""LoRA adapters with peft (`LoraConfig` + `get_peft_model`), and the names that go with them.

peft injects its layers into the model in place: a targeted linear `q_proj` becomes `q_proj.base_layer` (the frozen
pretrained weight) plus `q_proj.lora_A.default` / `q_proj.lora_B.default`; with trained embeddings, `embed_tokens`
becomes `embed_tokens.original_module` (frozen) and `embed_tokens.modules_to_save.default` (trained). This module maps
those names to the pretrained files' names (loading), to a plain model's names with the adapters merged into the
weights (the `final/` export), and to the peft adapter format (`final/adapter/`). Nothing here knows about ranks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

ADAPTER_PREFIX = "base_model.model."
LORA = re.compile(r"\.lora_[AB]\.default\.")


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    train_embeddings: bool
    # The model's head is its embedding: peft's trainable copies of both are tied too (ensure_weight_tying), so that
    # train_embeddings trains one matrix, as the base has one.
    tied_embeddings: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def describe(self) -> str:
        """What a checkpoint records: resuming with other settings is refused."""
        targets = ",".join(sorted(self.target_modules))
        return f"rank={self.rank} alpha={self.alpha:g} targets={targets} train_embeddings={self.train_embeddings}"

    def peft_config(self):
        from peft import LoraConfig

        tie = {"ensure_weight_tying": True} if self.tied_embeddings and self.train_embeddings else {}
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), bias="none", task_type="CAUSAL_LM",
                          modules_to_save=["embed_tokens", "lm_head"] if self.train_embeddings else None,
                          **tie)  # fmt: skip


def apply_lora(llm: nn.Module, settings: LoraSettings):
    """Freeze the model and inject the adapters (in place, also on `meta`); returns the PeftModel around it."""
    from peft import get_peft_model

    llm.requires_grad_(False)
    return get_peft_model(llm, settings.peft_config())


def is_adapter(name: str) -> bool:
    return bool(LORA.search(name))


def pretrained_name(name: str) -> str:
    """The pretrained file's name of a parameter of the injected model (not for adapter weights)."""
    return name.replace(".base_layer.", ".").replace(".original_module.", ".").replace(".modules_to_save.default.", ".")


@torch.no_grad()
def init_adapter(name: str, shape: torch.Size) -> torch.Tensor:
    """peft's initialisation: lora_A Kaiming-uniform (a = sqrt(5), as nn.Linear), lora_B zeros (the adapter starts as
    a no-op)."""
    weight = torch.empty(shape)
    if ".lora_B." in name:
        return weight.zero_()
    return nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def adapter_key(name: str) -> str:
    """The key of a trained tensor in peft's adapter_model.safetensors."""
    return ADAPTER_PREFIX + name.replace(".default.", ".").replace(".modules_to_save.", ".")


Source = tuple[str, torch.Size, Callable[[], torch.Tensor]]


def merged_sources(sources: list[Source], settings: LoraSettings) -> list[Source]:
    """A plain model's tensors with the adapters merged: W + (alpha / rank) B A, trained embeddings in place of the
    frozen ones. Fetches keep the order of `sources` (they may be collectives)."""
    by_name = {name: (shape, fetch) for name, shape, fetch in sources}
    out = []
    for name, shape, fetch in sources:
        if is_adapter(name) or (".original_module." in name and settings.train_embeddings):
            continue
        if ".base_layer." in name:
            prefix = name.split(".base_layer.")[0]
            a, b = by_name[f"{prefix}.lora_A.default.weight"][1], by_name[f"{prefix}.lora_B.default.weight"][1]

            def merge(fetch=fetch, a=a, b=b) -> torch.Tensor:
                weight, down, up = fetch(), a(), b()
                return weight.float() + settings.scale * (up.float() @ down.float())

            out.append((pretrained_name(name), shape, merge))
        else:
            out.append((pretrained_name(name), shape, fetch))
    return out


def adapter_sources(sources: list[Source]) -> list[Source]:
    """The tensors of peft's adapter file: the LoRA matrices and any trained embeddings, under peft's keys."""
    return [(adapter_key(name), shape, fetch) for name, shape, fetch in sources
            if is_adapter(name) or ".modules_to_save." in name]  # fmt: skip
