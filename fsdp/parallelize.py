"""Applies parallelism to a backbone's model in one documented order — activation checkpointing -> compile -> FSDP2 —
and offers the few verbs the training loop needs (gradient sync, clipping, global sums)."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed._composable import checkpoint as checkpoint_module
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

log = logging.getLogger(__name__)
# Attribute on the root FSDP module: the accumulation mode chosen by apply_parallelism, read by set_gradient_sync.
UNSHARDED_ACCUMULATION = "_shardtune_unsharded_grad_accumulation"
FORWARD_METHODS = ("chunked_loss_sum", "last_token_logits")


def apply_parallelism(
    model: nn.Module,
    layer_cls: type[nn.Module],
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype | None,
    reduce_dtype: torch.dtype = torch.float32,
    activation_checkpointing: str = "none",
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
    unsharded_grad_accumulation: bool = False,
    compile: str | None = None,
) -> nn.Module:
    """In place, in this order (each later step wraps what the earlier produced):
    1. activation checkpointing per `layer_cls` block (composable: parameter names are unchanged): `full` recomputes
       the whole block in backward; `selective` keeps the outputs of matmuls and attention and recomputes the rest
       (norms, activations, elementwise: cheap to recompute, costly to keep), as torchtitan's op-level policy;
    2. `compile` (a torch.compile backend, or None): torch.compile of each block's forward (FSDP's and
       checkpointing's hooks stay outside the compiled region, parameter names are unchanged); shapes repeat (packed
       rows, bucketed widths), so it compiles once or twice (a second time for dynamic lengths) and never again;
    3. `fully_shard` on every `layer_cls` block, then on the root — the FSDP2 form of
       `transformer_auto_wrap_policy({layer_cls})`; the root group holds embeddings, final norm and head.
    `param_dtype`: the compute dtype (bf16 over fp32 master weights), or None to compute in fp32; gradients are reduced
    in `reduce_dtype`. `reshard_after_forward=False` is ZeRO-2 (grad-op): parameters stay gathered from forward to
    backward. `unsharded_grad_accumulation`: see `set_gradient_sync`.
    """
    blocks = [m for m in model.modules() if isinstance(m, layer_cls)]
    if not blocks:
        raise ValueError(f"no {layer_cls.__name__} modules found to shard in {type(model).__name__}")
    if activation_checkpointing == "full":
        for block in blocks:
            checkpoint_module(block)
    elif activation_checkpointing == "selective":
        for block in blocks:
            checkpoint_module(block, context_fn=selective_context)
    if compile:
        for block in blocks:
            block.forward = torch.compile(block.forward, backend=compile)
    kwargs = dict(
        mesh=mesh,
        mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype if param_dtype else None),
        # Pinned host memory speeds up host<->GPU copies; it needs an accelerator, and a CPU run has nothing to copy.
        offload_policy=CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") if cpu_offload else OffloadPolicy(),
        reshard_after_forward=reshard_after_forward,
    )
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    for name in FORWARD_METHODS:  # other entry points than forward that use the root's parameters
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)
    # Sum (not average) gradients across ranks: the trainer divides the loss by the global supervised-token count,
    # which makes the gradient exact whatever the world size. Forcing a plain SUM also avoids NCCL's PREMUL_SUM,
    # which gloo lacks.
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    setattr(model, UNSHARDED_ACCUMULATION, unsharded_grad_accumulation)
    log.info(
        "FSDP2 over mesh %s: %d %s blocks + root; compute %s; reshard after forward %s; activation "
        "checkpointing %s; CPU offload %s",
        tuple(mesh.shape),
        len(blocks),
        layer_cls.__name__,
        param_dtype or torch.float32,
        reshard_after_forward,
        activation_checkpointing,
        "on" if cpu_offload else "off",
    )
    return model


# Ops whose outputs selective activation checkpointing keeps: the matmuls and every attention kernel, where the FLOPs
# are. SAC decides per op at the dispatcher, and a custom op is one op there: torch's varlen attention is the custom op
# torch_attn::_varlen_attn (the aten._flash_attention_forward inside it is never seen), and flash-attn's kernels are
# custom ops of their own (flashattn:: since 2.7, flash_attn:: before). Unlisted, each would be recomputed in backward.
SAVED_OPS = (
    "aten.mm", "aten.addmm", "aten.bmm", "aten.linear", "aten._scaled_dot_product_efficient_attention",
    "aten._scaled_dot_product_flash_attention", "aten._scaled_dot_product_flash_attention_for_cpu",
    "aten._scaled_dot_product_cudnn_attention", "aten._flash_attention_forward", "torch_attn._varlen_attn",
    "flashattn._flash_attn_forward", "flashattn._flash_attn_varlen_forward", "flash_attn._flash_attn_forward",
    "flash_attn._flash_attn_varlen_forward",
)  # fmt: skip


def saved_ops() -> set:
    """The SAVED_OPS that exist in this process (flash-attn's only once it is imported)."""
    import torch.nn.attention.varlen  # noqa: F401  (registers torch_attn::_varlen_attn)

    found = set()
    for name in SAVED_OPS:
        namespace, op = name.split(".")
        try:
            found.add(getattr(getattr(torch.ops, namespace), op).default)
        except (AttributeError, RuntimeError):
            continue
    return found


def selective_context():
    """Fresh contexts for one checkpointed forward (torch calls this per forward, after flash-attn has loaded)."""
    saved = saved_ops()

    def keep(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(keep)


def set_gradient_sync(model: nn.Module, last_micro_step: bool) -> None:
    """Gradient accumulation that keeps gradients sharded. Every micro-step reduce-scatters (FSDP2 adds the result
    into the sharded gradient), so between micro-steps a rank holds 1/N of the gradients, not the whole model's; with
    replicas (hybrid, none) only the all-reduce across replicas waits for the last micro-step. With
    `unsharded_grad_accumulation` the reduce-scatter waits too (less communication, but every rank holds unsharded
    fp32 gradients of the whole model until the last micro-step)."""
    if not isinstance(model, FSDPModule):
        return
    if getattr(model, UNSHARDED_ACCUMULATION, False):
        model.set_requires_gradient_sync(last_micro_step)
    else:
        model.set_requires_all_reduce(last_micro_step)


def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> float:
    """Global L2 norm of all gradients (every shard on every rank); clips in place when max_norm > 0."""
    grads = [p for p in parameters if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(grads, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in grads])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)
