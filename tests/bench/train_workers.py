"""The ranks' side of `make bench-train` (run by torchrun from tests/bench/bench_train.py): what every contestant
trains on (model shape, batches, shardtune's tokenized bundled data and sampler), the hand-written FSDP2 loop, the HF
Trainer, and the step-by-step pairing of shardtune with the minimal loop. Each worker writes its per-step times.

    torchrun ... tests/bench/train_workers.py --worker minimal|hf-fsdp2|hf-default|interleaved --model-dir D \
        --layout padded|packed|flat --steps N --out PREFIX
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SHAPE = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=8, max_position_embeddings=2048)  # fmt: skip
GLOBAL_BATCH, MICRO_BATCH, LR, SEED = 16, 4, 1e-4, 42
LOSS_CHUNK = 256  # shardtune's default --train.loss_chunk_tokens
MAX_LENGTH = {False: 128, True: 256}  # padded examples (bundled conversations are < 80 tokens) | packed rows
CONTESTANTS = ("shardtune-padded", "shardtune-packed", "minimal-padded", "minimal-packed", "hf-fsdp2-padded",
               "hf-fsdp2-flat", "hf-default-flat")  # fmt: skip


def peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def shared_data(model_dir: str, packing: bool):
    """shardtune's tokenized bundled data (its cache) and sampler: what every contestant trains on."""
    from backbones import build_backbone
    from launch.config import DataConfig
    from launch.data import GlobalBatchSampler, build_tokenized

    backbone = build_backbone("llama2-tiny-chat", path=model_dir, load_weights=False)
    config = DataConfig(path="bundled", max_length=MAX_LENGTH[packing], packing=packing)
    data = build_tokenized(config, backbone, "train")
    lengths = None if packing else data.dataset.lengths
    return backbone.tokenizer, data, GlobalBatchSampler(len(data.dataset), GLOBAL_BATCH, SEED, lengths)


def build_minimal(model_dir: str, world: int):
    """The hand-written loop's model and optimizer: fully_shard per block + root, plain AdamW."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0, foreach=True)
    return model, optimizer


def minimal_step(model, optimizer, tokenizer, data, sampler, packing: bool, step: int, rank: int, world: int) -> None:
    """One optimizer step of the hand-written loop over this rank's share of global batch `step`: full logits."""
    import torch
    import torch.distributed as dist

    from launch.data import collate

    micro = [collate([data.dataset[i] for i in idx], tokenizer.pad_token_id, "packed" if packing else "padded")
             for idx in sampler.micro_batches(step, rank, world, MICRO_BATCH)]  # fmt: skip
    count = torch.tensor(float(sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)))
    dist.all_reduce(count)
    for batch in micro:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                                 ignore_index=-100, reduction="sum") / count  # fmt: skip
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def minimal_worker(model_dir: str, packing: bool, steps: int, out: str) -> None:
    """A hand-written FSDP2 loop, as short as it can be while training exactly what shardtune trains."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tokenizer, data, sampler = shared_data(model_dir, packing)
    model, optimizer = build_minimal(model_dir, world)
    times, last = [], time.perf_counter()
    for step in range(steps):
        minimal_step(model, optimizer, tokenizer, data, sampler, packing, step, rank, world)
        now = time.perf_counter()
        times.append(now - last)
        last = now
    write_result(out, rank, times)
    dist.destroy_process_group()


def interleaved_worker(model_dir: str, packing: bool, out: str, shardtune_argv: list[str]) -> None:
    """shardtune (`launch.train.main`, in this process) and the hand-written loop take turns step by step in one job:
    after each shardtune step the minimal loop runs the same global batch on its own model. Whatever else loads the
    machine then weighs on both alike, seconds apart. shardtune's step k is timed from the end of the minimal step
    k - 1 to the start of minimal step k (its loop, metrics and step-end collective included)."""
    import torch.distributed as dist

    from launch import train
    from launch.trainer import Trainer

    state: dict = {"model": None, "last_end": None, "shardtune": [], "minimal": []}
    train_step = Trainer.train_step

    def paired_step(self: Trainer) -> dict:
        record = train_step(self)
        rank, world = dist.get_rank(), dist.get_world_size()
        if state["model"] is None:  # built once the process group exists (shardtune's main starts it)
            state["data"] = shared_data(model_dir, packing)
            state["model"], state["optimizer"] = build_minimal(model_dir, world)
        start = time.perf_counter()
        if state["last_end"] is not None:
            state["shardtune"].append(start - state["last_end"])
        tokenizer, data, sampler = state["data"]
        minimal_step(state["model"], state["optimizer"], tokenizer, data, sampler, packing, self.step - 1, rank,
                     world)  # fmt: skip
        state["last_end"] = time.perf_counter()
        state["minimal"].append(state["last_end"] - start)
        return record

    Trainer.train_step = paired_step
    if train.main(shardtune_argv) != 0:
        raise SystemExit("the shardtune run failed")
    rank = int(os.environ["RANK"])
    Path(f"{out}.rank{rank}").write_text(json.dumps({"shardtune": state["shardtune"], "minimal": state["minimal"]}))


def hf_worker(model_dir: str, fsdp: bool, flat: bool, steps: int, out: str) -> None:
    """transformers' Trainer on the same examples, in the same global batches (a sequential sampler over them)."""
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import (
        DataCollatorForSeq2Seq,
        DataCollatorWithFlattening,
        LlamaForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    tokenizer, data, sampler = shared_data(model_dir, packing=False)
    order = [i for step in range(steps) for i in sampler.global_batch(step)]
    rows = [{"input_ids": data.dataset[i]["input_ids"], "labels": data.dataset[i]["labels"]} for i in order]
    model = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32)
    fsdp_args = {}
    if fsdp:
        wrap = {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}
        fsdp_args = dict(fsdp="full_shard auto_wrap", fsdp_config=wrap)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=MICRO_BATCH, max_steps=steps,
        gradient_accumulation_steps=GLOBAL_BATCH // (MICRO_BATCH * world), learning_rate=LR, adam_beta2=0.95,
        weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="constant", save_strategy="no", report_to=[],
        logging_strategy="no", use_cpu=True, seed=SEED, remove_unused_columns=False, disable_tqdm=True,
        dataloader_drop_last=True, **fsdp_args,
    )  # fmt: skip
    times: list[float] = []

    class StepTimes(TrainerCallback):
        last = None

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            times.append(now - (self.last or now))
            self.last = now

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

    class SameBatches(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

        def create_accelerator_and_postprocess(self):
            """accelerate drops its FSDP plugin on CPU processes (MULTI_CPU: it runs DDP instead); set the state as
            it is on GPUs, so that the Trainer really shards with FSDP2 (the result records the wrapper it used)."""
            super().create_accelerator_and_postprocess()
            if fsdp and getattr(self.accelerator.state, "fsdp_plugin", None) is None:
                from accelerate import FullyShardedDataParallelPlugin
                from accelerate.utils import DistributedType

                self.accelerator.state.distributed_type = DistributedType.FSDP
                self.accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
                self.is_fsdp_enabled = True

    if flat:
        collator = DataCollatorWithFlattening()
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    trainer = SameBatches(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[StepTimes()])
    trainer.train()
    wrapped = type(trainer.model_wrapped).__name__  # FSDPLlamaForCausalLM under FSDP2, DistributedDataParallel else
    write_result(out, rank, times, wrapped=wrapped)


def write_result(out: str, rank: int, times: list[float], **extra) -> None:
    Path(f"{out}.rank{rank}").write_text(json.dumps({"rank": rank, "step_s": times, "peak_mib": peak_mib(), **extra}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", required=True, choices=("minimal", "hf-fsdp2", "hf-default", "interleaved"))
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--layout", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--shardtune-argv", help="JSON list: the shardtune run that the minimal loop pairs with")
    args = parser.parse_args()
    if args.worker == "interleaved":
        interleaved_worker(args.model_dir, args.layout == "packed", args.out, json.loads(args.shardtune_argv))
    elif args.worker == "minimal":
        minimal_worker(args.model_dir, args.layout == "packed", args.steps, args.out)
    else:
        hf_worker(args.model_dir, args.worker == "hf-fsdp2", args.layout == "flat", args.steps, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
