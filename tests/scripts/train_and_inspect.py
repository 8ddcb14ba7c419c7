"""Test driver (run under torchrun or plain python): trains through launch.train's own functions, then records what
tests cannot see from outside: the dtypes of the sharded master weights and the trained model's logits on a batch."""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch

from fsdp import init_distributed, read_env, teardown
from launch.data import collate
from launch.metrics import setup_logging
from launch.train import fit_and_export, prepare


def main() -> None:
    env = read_env()
    setup_logging(env.is_rank0)
    prepared = prepare(sys.argv[1:], env)
    init_distributed(env)
    trainer = model = None
    try:
        trainer = fit_and_export(prepared, env)
        model = trainer.model.eval()
        batch = collate([prepared.eval_data.dataset[i] for i in range(4)], prepared.backbone.tokenizer.pad_token_id, False)
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        if env.is_rank0:
            out = Path(prepared.config.run.output_dir)
            torch.save({"batch": batch, "logits": logits.float()}, out / "inspect_logits.pt")
            dtypes = sorted({str(p.dtype) for p in model.parameters()} | {str(p.to_local().dtype) for p in model.parameters()})
            (out / "inspect.json").write_text(json.dumps({"param_dtypes": dtypes}))
    finally:
        prepared = trainer = model = None  # release the sharded model before its process groups (see launch.train)
        gc.collect()
        teardown()


if __name__ == "__main__":
    main()
