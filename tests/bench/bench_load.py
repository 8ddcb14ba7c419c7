"""`make bench-load`: loading a 374M-parameter LLaMA into FSDP2 on CPU processes, three ways, side by side; then a few
training steps of it in full and with LoRA, for their peak memory and optimizer state.

  naive        every rank `from_pretrained`s the whole model, then shards it (what OOMs hosts at 70B, OpenVLA #208)
  rank0-model  shardtune before: every rank builds on `meta` and shards; rank 0 also builds a full second model with
               `from_pretrained` and broadcasts its state dict; each rank keeps only its shards
  streamed     shardtune now: the model is built once, on `meta`, and sharded; rank 0 reads one tensor at a time from
               the safetensors files and broadcasts it; each rank keeps only its shards

Per rank: peak resident memory (VmHWM) and its growth over the process's size before loading (after the tokenizer
and the module tree were built on `meta`), as multiples of the fp32 model size. The target for streamed: every rank,
rank 0 included, grows by at most 1/N of the model plus the largest tensor. The streamed pass also times a sharded
DCP save (model + optimizer), the streaming HF export, and a rank-0 full-state-dict gather + save for comparison.
Not a test: numbers depend on the machine.

    python tests/bench/bench_load.py [--nproc 2]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

BENCH_CONFIG = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=16,
    max_position_embeddings=2048,
)


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def build_bench_model(directory: Path) -> Path:
    """A LLaMA-2-shaped model with ~374M parameters and the tiny tokenizer, saved as an HF directory (once)."""
    if (directory / "config.json").is_file():
        return directory
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from backbones.tiny import build_tiny_tokenizer

    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".bench-"))
    LlamaForCausalLM(LlamaConfig(**BENCH_CONFIG)).save_pretrained(tmp)
    build_tiny_tokenizer().save_pretrained(tmp)
    os.rename(tmp, directory)
    return directory


def train_worker(stage: str, model_dir: str, out_json: str) -> None:
    """A few training steps of the 374M model with the full or the LoRA stage: peak RSS and optimizer-state bytes."""
    import torch
    import torch.distributed as dist

    from backbones import build_backbone
    from backbones.lora import LoraSettings
    from fsdp import all_reduce_sum, apply_parallelism, build_mesh, init_distributed, is_rank0, read_env, teardown
    from fsdp.materialize import load_from_rank0, materialize
    from launch.config import TrainConfig
    from launch.optim import build_optimizer, decay_parameter_names
    from launch.stage import apply_stage
    from launch.trainer import token_loss_sum

    env = read_env()
    init_distributed(env)
    backbone = build_backbone("llama2-tiny-chat", path=model_dir, load_weights=False)
    dist.barrier()
    before = rss_mb("VmRSS")
    lora = LoraSettings(32, 16.0, 0.0, backbone.linear_layer_names, False) if stage == "lora" else None
    apply_stage(backbone, stage, lora)
    decay = decay_parameter_names(backbone.llm)
    model = apply_parallelism(backbone.llm, backbone.transformer_layer_cls, build_mesh(env, "full"), param_dtype=None)
    materialize(model, env.device)
    backbone.init_non_persistent_buffers()
    load_from_rank0(model, backbone.pretrained_weights() if is_rank0() else None, env.device)
    optimizer = build_optimizer(model, decay, TrainConfig(lr=1e-4))
    torch.manual_seed(env.rank)
    start = time.perf_counter()
    for _ in range(3):
        ids = torch.randint(3, 900, (2, 256))
        batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
        (token_loss_sum(model, batch, 1024) / ids.numel()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    local = sum(t.to_local().nbytes if hasattr(t, "to_local") else t.nbytes
                for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))  # fmt: skip
    (optimizer_bytes,) = all_reduce_sum([float(local)], env.device)
    result = {"rank": env.rank, "mode": f"train-{stage}", "rss_before_mb": before, "peak_mb": rss_mb("VmHWM"),
              "step_s": (time.perf_counter() - start) / 3, "optimizer_mb": optimizer_bytes / 2**20,
              "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}  # fmt: skip
    Path(f"{out_json}.rank{env.rank}").write_text(json.dumps(result))
    model = backbone = optimizer = None
    gc.collect()
    teardown()


def worker(mode: str, model_dir: str, out_json: str) -> None:
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    from transformers import AutoModelForCausalLM

    from backbones import build_backbone
    from fsdp import apply_parallelism, broadcast_object, build_mesh, init_distributed, is_rank0, read_env, teardown
    from fsdp.checkpoint import CheckpointManager, SavePolicy
    from fsdp.export import export_hf, model_tensor_sources
    from fsdp.materialize import load_from_rank0, materialize

    env = read_env()
    init_distributed(env)
    optimizer = full = None
    result = {"rank": env.rank, "mode": mode}
    dist.barrier()
    start = time.perf_counter()
    backbone = build_backbone("llama2-tiny-chat", path=model_dir, load_weights=False)
    result["rss_before_mb"] = rss_mb("VmRSS")  # after the meta build (tokenizer, module tree): what loading adds
    if mode == "naive":  # every rank loads the whole model with plain transformers, then shards it
        backbone.llm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    shard = dict(param_dtype=None)  # fp32 master weights either way: the load is what is measured
    model = apply_parallelism(backbone.llm, backbone.transformer_layer_cls, build_mesh(env, "full"), **shard)
    if mode == "rank0-model":  # shardtune before: rank 0 builds a second, full model and broadcasts its state dict
        materialize(model, env.device)
        backbone.init_non_persistent_buffers()
        full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32) if is_rank0() else None
        state = full.state_dict() if full is not None else {}
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        del state, full
    elif mode == "streamed":  # shardtune now: rank 0 reads one tensor at a time into the model it already built
        materialize(model, env.device)
        backbone.init_non_persistent_buffers()
        load_from_rank0(model, backbone.pretrained_weights() if is_rank0() else None, env.device)
    dist.barrier()
    result.update(
        load_s=time.perf_counter() - start,
        peak_mb=rss_mb("VmHWM"),
        rss_after_mb=rss_mb("VmRSS"),
        params=sum(p.numel() for p in model.parameters()),
        largest_tensor_mb=max(p.numel() for p in model.parameters()) * 4 / 2**20,
    )
    if mode == "streamed":
        scratch = Path(tempfile.mkdtemp(dir=Path(model_dir).parent)) if is_rank0() else None
        scratch = Path(broadcast_object(str(scratch) if scratch else None))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        start = time.perf_counter()
        CheckpointManager(scratch / "ckpt", SavePolicy(keep_last=1), {"backbone": "bench"}, env.device).save(
            1, model, optimizer, {"step": 1}, force=True
        )
        result["dcp_save_s"] = time.perf_counter() - start
        start = time.perf_counter()
        export_hf(
            model_tensor_sources(model),
            scratch / "export",
            "bf16",
            5000,
            write=is_rank0(),
            save_extras=lambda d: backbone.llm.config.save_pretrained(d),
        )
        result["streaming_export_s"] = time.perf_counter() - start
        dist.barrier()
        rss = rss_mb("VmRSS")
        start = time.perf_counter()
        full_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if is_rank0():
            save_file({k: v.to(torch.bfloat16) for k, v in full_state.items()}, scratch / "gathered.safetensors")
        dist.barrier()
        result["rank0_gather_save_s"] = time.perf_counter() - start
        result["gather_rss_growth_mb"] = rss_mb("VmRSS") - rss
        del full_state
        dist.barrier()
        if is_rank0():
            shutil.rmtree(scratch)
    Path(f"{out_json}.rank{env.rank}").write_text(json.dumps(result))
    model = backbone = optimizer = None  # release the sharded model before its process groups (see launch.train)
    gc.collect()
    teardown()


MODES = ("naive", "rank0-model", "streamed", "train-full", "train-lora")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--worker", choices=MODES)
    parser.add_argument("--model-dir")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        if args.worker.startswith("train-"):
            train_worker(args.worker.removeprefix("train-"), args.model_dir, args.out)
        else:
            worker(args.worker, args.model_dir, args.out)
        return 0
    from backbones.tiny import cache_root

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    model_dir = build_bench_model(root / "bench-llama-374m")
    fp32_mb = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**20
    results = {}
    for mode in MODES:
        out = Path(tempfile.mkdtemp()) / "result"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                   __file__, "--worker", mode, "--model-dir", str(model_dir), "--out", str(out)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(command, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
        results[mode] = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(args.nproc)]
    first = results["streamed"][0]
    target = 1 / args.nproc + first["largest_tensor_mb"] / fp32_mb
    print(
        f"\nmodel: {first['params'] / 1e6:.0f}M parameters, fp32 size {fp32_mb:.0f} MiB, largest tensor "
        f"{first['largest_tensor_mb']:.0f} MiB; {args.nproc} CPU processes (gloo); target for every rank: growth "
        f"<= 1/{args.nproc} + largest tensor = {target:.2f} x fp32\n"
    )
    print(f"{'mode':<12} {'rank':>4} {'load s':>7} {'peak MiB':>9} {'growth MiB':>10} {'growth/fp32':>11}")
    for mode, ranks in results.items():
        if mode.startswith("train-"):
            continue
        for r in ranks:
            growth = r["peak_mb"] - r["rss_before_mb"]
            print(
                f"{mode:<12} {r['rank']:>4} {r['load_s']:>7.1f} {r['peak_mb']:>9.0f} {growth:>10.0f} "
                f"{growth / fp32_mb:>11.2f}"
            )
    print(f"\nsharded DCP save (model + AdamW state): {first['dcp_save_s']:.1f} s")
    print(f"streaming HF export (bf16):             {first['streaming_export_s']:.1f} s")
    print(
        f"rank-0 full-state gather + save (bf16): {first['rank0_gather_save_s']:.1f} s, rank-0 RSS growth "
        f"{first['gather_rss_growth_mb']:.0f} MiB ({first['gather_rss_growth_mb'] / fp32_mb:.2f} x fp32)"
    )
    print("\n3 training steps (2 x 256 tokens a rank, fp32, AdamW; LoRA rank 32 on every linear layer):")
    print(
        f"{'stage':<6} {'rank':>4} {'trainable':>11} {'optimizer MiB':>13} {'peak MiB':>9} {'growth MiB':>10} "
        f"{'s/step':>7}"
    )
    for stage in ("full", "lora"):
        for r in results[f"train-{stage}"]:
            print(f"{stage:<6} {r['rank']:>4} {r['trainable']:>11,} {r['optimizer_mb']:>13.0f} {r['peak_mb']:>9.0f} "
                  f"{r['peak_mb'] - r['rss_before_mb']:>10.0f} {r['step_s']:>7.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
