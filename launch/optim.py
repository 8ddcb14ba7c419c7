"""AdamW with decay / no-decay groups, and the learning-rate schedule (linear warmup, then cosine decay or constant)."""

from __future__ import annotations

import math

import torch
from torch import nn

from launch.config import TrainConfig


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Trainable matrices get weight decay; vectors (norm weights, biases) do not. Decide this on the unsharded model:
    once FSDP flattens parameters their shapes no longer tell (OpenVLA's groups end up all no-decay)."""
    return {name for name, p in model.named_parameters() if p.requires_grad and p.ndim >= 2}


def adamw_implementation(parameters_device: torch.device) -> dict[str, bool]:
    """The one place AdamW's kernel is chosen: fused (one kernel for all parameters) where the parameters live on a
    GPU, DTensors included; foreach (batched ops) elsewhere, e.g. on the CPU or under CPU offload."""
    return {"fused": True} if parameters_device.type == "cuda" else {"foreach": True}


def build_optimizer(model: nn.Module, decay_names: set[str], train: TrainConfig) -> torch.optim.AdamW:
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for name, p in params if name in decay_names], "weight_decay": train.weight_decay},
        {"params": [p for name, p in params if name not in decay_names], "weight_decay": 0.0},
    ]
    device = next((p.device for _, p in params), torch.device("cpu"))
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=train.lr, betas=tuple(train.betas), eps=1e-8,
                             **adamw_implementation(device))  # fmt: skip


def build_schedule(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int):
    warmup = math.ceil(train.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if train.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
