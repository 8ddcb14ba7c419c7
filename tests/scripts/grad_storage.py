"""Test driver (torchrun): trains through launch.train's own functions and, before every micro-step but the first of
each optimizer step, records how many bytes of gradient this rank holds: its sharded gradients plus any unsharded
gradients FSDP2 keeps between micro-steps. Writes grad_storage-rank{R}.json (also the fp32 size of the whole model).
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

from fsdp_internals import param_groups
from torch.distributed.fsdp import FSDPModule

import launch.trainer
from fsdp import init_distributed, is_rank0, read_env, teardown
from launch.metrics import setup_logging
from launch.train import fit_and_export, prepare


def gradient_bytes(model) -> int:
    """Bytes of gradient storage on this rank, read from FSDP2's parameter groups (test-only internals)."""
    total = 0
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        for group in param_groups(module):
            for param in group.fsdp_params:
                if param.sharded_param.grad is not None:
                    total += param.sharded_param.grad.to_local().nbytes
                if param.unsharded_accumulated_grad is not None:
                    total += param.unsharded_accumulated_grad.nbytes
                unsharded = getattr(param, "_unsharded_param", None)
                if unsharded is not None and unsharded.grad is not None:
                    total += unsharded.grad.nbytes
    return total


def main() -> None:
    env = read_env()
    setup_logging(is_rank0())
    prepared = prepare(sys.argv[1:], env)
    init_distributed(env)
    seen: list[int] = []
    original = launch.trainer.token_loss_sum
    calls = {"n": 0}

    def measured(model, batch, *args):
        if calls["n"] % 2:  # two micro-steps per optimizer step: measure before the second
            seen.append(gradient_bytes(model))
        calls["n"] += 1
        return original(model, batch, *args)

    launch.trainer.token_loss_sum = measured
    trainer = None
    try:
        trainer = fit_and_export(prepared, env)
        model_bytes = sum(p.numel() * 4 for p in trainer.model.parameters())
        out = Path(prepared.config.run.output_dir) / f"grad_storage-rank{env.rank}.json"
        out.write_text(json.dumps({"between_micro_steps": seen, "model_fp32_bytes": model_bytes}))
    finally:
        prepared = trainer = None
        gc.collect()
        teardown()


if __name__ == "__main__":
    main()
