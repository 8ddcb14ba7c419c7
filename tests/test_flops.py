"""The FLOP count behind TFLOP/s and MFU, checked by hand on LLaMA-2 7B's published shape for both stages, and the
per-device peak table."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from backbones.llama2 import LLAMA2_7B
from launch.flops import build_flop_counter, peak_bf16_flops

D, F, L, V = 4096, 11008, 32, 32064  # 32000 + <PAD>, padded to a multiple of 64
BLOCK = 4 * D * D + 3 * D * F  # q, k, v, o + gate, up, down
HEAD = V * D


@pytest.fixture(scope="module")
def llama7b():
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**{**LLAMA2_7B, "vocab_size": V}))


def test_full_fine_tune_counts_6_flops_per_matmul_weight_and_none_for_embeddings(llama7b):
    llama7b.requires_grad_(True)
    counter = build_flop_counter(llama7b)
    assert counter.matmul_per_token == 6 * (L * BLOCK + HEAD)  # embed_tokens (a lookup) counts nothing
    assert counter.attention_per_pair == 3 * 2 * 2 * L * D
    n = 4096  # one full-context sequence: causal pairs n(n+1)/2
    assert counter.step_flops([n]) == 6 * (L * BLOCK + HEAD) * n + 3 * 4 * L * D * n * (n + 1) // 2
    assert counter.per_token(4096) == pytest.approx(42.87e9, rel=1e-3)
    # Two examples of 100 and 300 tokens: attention only within each.
    assert counter.step_flops([100, 300]) == counter.step_flops([100]) + counter.step_flops([300])


def test_last_layer_stage_counts_4_flops_for_frozen_weights(llama7b):
    llama7b.requires_grad_(False)
    for module in (llama7b.model.embed_tokens, llama7b.model.layers[-1], llama7b.lm_head):
        module.requires_grad_(True)
    counter = build_flop_counter(llama7b)
    assert counter.matmul_per_token == 6 * (BLOCK + HEAD) + 4 * (L - 1) * BLOCK
    full = 6 * (L * BLOCK + HEAD)
    assert full / counter.matmul_per_token == pytest.approx(1.463, abs=1e-3)  # what 6N overstated


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H100 NVL", 835),
        ("NVIDIA H200", 989),
        ("NVIDIA H200 NVL", 835),
        ("NVIDIA GH200 480GB", 989),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA A100-PCIE-40GB", 312),
        ("NVIDIA A100 80GB PCIe", 312),
        ("NVIDIA L40S", 362),
        ("NVIDIA L4", 121),
        ("NVIDIA GeForce RTX 4090", None),
        ("NVIDIA A10G", None),
        ("Tesla T4", None),
    ],
)
def test_peak_is_looked_up_by_the_exact_device(name, tflops):
    assert peak_bf16_flops(name) == (tflops * 1e12 if tflops else None)
