"""Model FLOPs of a training step, for TFLOP/s and MFU (model FLOPs utilisation), and the dense bf16 peak of known GPUs.

FLOPs of a step = sum over matmul weights W of c_W * |W| * tokens + attention, where
  - c_W = 6 for a trainable weight: forward 2, input gradient 2, weight gradient 2 FLOPs per weight and token
    (Kaplan et al. 2020, "Scaling Laws", sec. 2.1; Narayanan et al. 2021, "Efficient Large-Scale Language Model
    Training on GPU Clusters Using Megatron-LM", sec. 5.1);
  - c_W = 4 for a frozen weight: no weight gradient, but the input gradient still flows through it to the trainable
    parameters below (every stage trains something at or below the first block: embeddings or adapters);
  - embedding lookups are not matmuls and count 0; norms and activations are ignored, as in the sources above;
  - attention, per layer and sequence of n tokens: QK^T and AV take 2 * heads * head_dim FLOPs each per
    (query, key) pair, over the n(n+1)/2 pairs a causal mask keeps, times 3 for forward and backward (PaLM,
    Chowdhery et al. 2022, appendix B, counts 12 * layers * heads * head_dim * n per token for the full square;
    flash kernels skip the masked half, so it is counted here as n(n+1)/2 pairs). Padding and cross-example pairs are
    not useful work and are not counted.
Activation-checkpointing recomputation is not counted: MFU counts model FLOPs, not hardware FLOPs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's datasheets, matched in order against
# torch.cuda.get_device_name(); the SXM H100 reports itself as e.g. "NVIDIA H100 80GB HBM3".
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bGH200\b", 989.0),
    (r"\bH200 NVL\b", 835.0),
    (r"\bH200\b", 989.0),
    (r"\bH100 NVL\b", 835.0),
    (r"\bH100 PCIe\b", 756.0),
    (r"\bH100\b", 989.0),
    (r"\bH800 PCIe\b", 756.0),
    (r"\bH800\b", 989.0),
    (r"\bA100\b", 312.0),  # SXM4 and PCIe, 40 and 80 GB alike
    (r"\bA800\b", 312.0),
    (r"\bL40S\b", 362.0),
    (r"\bL40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
    (r"\bB200\b", 2250.0),
)


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of one device, or None for a device not in the table (then no MFU is logged)."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops * 1e12
    return None


@dataclass(frozen=True)
class FlopCounter:
    matmul_per_token: float  # sum of c_W * |W|
    attention_per_pair: float  # 3 (fwd + bwd) * 2 matmuls * 2 FLOPs * layers * heads * head_dim

    def step_flops(self, sequence_lengths: Iterable[int]) -> float:
        """FLOPs of a step that processed these sequences (the real examples, without padding)."""
        lengths = list(sequence_lengths)
        pairs = sum(n * (n + 1) // 2 for n in lengths)
        return self.matmul_per_token * sum(lengths) + self.attention_per_pair * pairs

    def per_token(self, sequence_length: int) -> float:
        return self.step_flops([sequence_length]) / sequence_length


def build_flop_counter(model: nn.Module) -> FlopCounter:
    """From the unsharded model (meta is fine) after the stage has set `requires_grad`: call it before sharding."""
    matmul = sum(
        (6 if m.weight.requires_grad else 4) * m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)
    )
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 3 * 2 * 2 * config.num_hidden_layers * config.num_attention_heads * head_dim
    return FlopCounter(float(matmul), float(attention))
