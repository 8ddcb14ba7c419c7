"""AdamW groups and the learning-rate schedule, in-process."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from launch.config import TrainConfig
from launch.optim import build_optimizer, build_schedule, decay_parameter_names


def lrs(schedule: str, warmup_ratio: float, total: int) -> list[float]:
    param = nn.Parameter(torch.zeros(2, 2))
    train = TrainConfig(lr=1.0, warmup_ratio=warmup_ratio, schedule=schedule)
    optimizer = torch.optim.AdamW([param], lr=train.lr)
    scheduler = build_schedule(optimizer, train, total)
    out = []
    for _ in range(total):
        out.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return out


def test_cosine_schedule_warms_up_linearly_then_decays_to_zero():
    values = lrs("cosine", 0.1, 100)  # 10 warmup steps
    assert values[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert values[10] == pytest.approx(1.0)
    assert values[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert values[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


def test_constant_schedule_holds_after_warmup_and_no_warmup_starts_at_full_lr():
    assert lrs("constant", 0.25, 8) == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert lrs("cosine", 0.0, 4)[0] == pytest.approx(1.0)


def test_decay_groups_keep_vectors_and_frozen_parameters_out():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[2].requires_grad_(False)
    names = decay_parameter_names(model)
    assert names == {"0.weight"}
    optimizer = build_optimizer(model, names, TrainConfig(weight_decay=0.1))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3  # bias, norm weight and bias
