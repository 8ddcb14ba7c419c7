"""`make gpu-check-bench`: training throughput of 1B-class shapes on one GPU, written as it goes.

Shapes (random init, no weights on disk): LLaMA-2's at 1.1B (22 layers, d 2048, 32 heads, ffn 5632, vocab 32064) and
Llama-3.2-1B's (16 layers, d 2048, 32 query / 8 key-value heads, ffn 8192, vocab 128256, tied embeddings). Each is
fine-tuned in full at seq 4096, packed, bf16 over fp32 master weights, one variant per fresh process: every attention
kernel that runs here with and without activation checkpointing, then on the best kernel selective checkpointing,
the full-logits loss, and torch.compile last (its first compile is the slowest row). A row reports tokens/s, TFLOP/s
and MFU (FLOPs as launch/flops.py counts them), peak CUDA memory and the planner's estimate beside it.

Each finished row is appended to --out as one JSON line at once, and printed: a command stopped at its time limit
keeps every row before it. A variant that runs past its timeout is killed and recorded as such; one that would not
fit in what is left of --budget-s is recorded as skipped.

    python tests/bench/gpu_throughput.py --out gpu-check/throughput.jsonl --budget-s 270
    python tests/bench/gpu_throughput.py --cpu-smoke --out runs/throughput.jsonl   # the harness on CPU, tiny shapes
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

KERNELS = ("flash_attention_2", "torch_varlen", "sdpa")
SEQ, MICRO_BATCH, WARMUP, TIMED = 4096, 4, 3, 10
VARIANT_TIMEOUT_S, COMPILE_TIMEOUT_S = 90, 180  # a row normally takes 20-40 s; compiling 22 blocks takes longer
CPU_SMOKE = {"seq": 128, "micro_batch": 2, "warmup": 1, "timed": 1}


def run_variant(variant: dict, shape: str, seq: int, micro_batch: int, warmup: int, timed: int) -> dict:
    """One row, in this process: build, train, measure."""
    import harness
    import torch

    from fsdp import init_distributed, read_env, teardown

    env = read_env()
    init_distributed(env)
    model = trainer = None
    try:
        v = harness.Variant(**variant)
        dims = harness.SHAPES[shape]
        model, flops, decay = harness.build_model(dims, env, v)
        data = harness.synthetic_packed(dims["vocab_size"], seq, rows=micro_batch * (warmup + timed))
        trainer = harness.build_trainer(model, flops, decay, env, data, v.attn, micro_batch, micro_batch,
                                        warmup + timed, v)  # fmt: skip
        result = harness.measure(trainer, warmup, timed)
        result["params"] = sum(p.numel() for p in model.parameters())
        result["planned_allocated_gib"] = planned_allocated_gib(dims, v, seq, micro_batch)
        if "peak_memory_gib" in result:  # the planner's calibration: its estimate against the measured peak
            result["planner_error"] = result["planned_allocated_gib"] / result["peak_memory_gib"] - 1
        result["device"] = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu"
        return result
    finally:
        model = trainer = None
        teardown()


def planned_allocated_gib(dims: dict, variant, seq: int, micro: int) -> float:
    """launch.plan's estimate for this row, without its framework margin (max_memory_allocated excludes it too)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from launch.plan import GiB, Shape, memory_per_gpu, sharded_bytes

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**dims))
    shape = Shape(dims["num_hidden_layers"], dims["hidden_size"], dims["intermediate_size"],
                  dims["num_attention_heads"], dims["num_key_value_heads"], dims["vocab_size"])  # fmt: skip
    settings = dict(sharding="full", micro_batch=micro, max_length=seq, checkpointing=variant.activation_checkpointing,
                    attn=variant.attn, loss_chunk=variant.loss_chunk_tokens)  # fmt: skip
    memory = memory_per_gpu(model, shape, sharded_bytes(model, 1), **settings, cpu_offload=False,
                            unsharded_accumulation=False)  # fmt: skip
    return (sum(memory.values()) - memory["framework_and_fragmentation"]) / GiB


def available_kernels(cpu: bool) -> list[str]:
    import torch

    from launch.attention import kernel_problem

    if cpu:
        return ["sdpa"]
    device = torch.device("cuda", 0)
    return [k for k in KERNELS if k == "sdpa" or kernel_problem(k, device, "bf16") is None]


def variants(kernels: list[str], cpu: bool) -> list[tuple[str, object]]:
    """(shape, variant) rows in the order they run: every kernel without and with full checkpointing on the LLaMA-2
    shape, the best kernel on Llama-3.2-1B's, then selective checkpointing and the full-logits loss, compile last."""
    import harness

    if cpu:
        return [(shape, harness.Variant(attn="sdpa", mixed_precision="fp32")) for shape in ("tiny", "tiny-llama3")]
    best = kernels[0]
    rows = [("llama2-1.1b", harness.Variant(attn=k, activation_checkpointing=ac)) for k in kernels
            for ac in ("none", "full")]  # fmt: skip
    rows += [("llama3.2-1b", harness.Variant(attn=best, activation_checkpointing="full")),
             ("llama2-1.1b", harness.Variant(attn=best, activation_checkpointing="selective")),
             ("llama2-1.1b", harness.Variant(attn=best, activation_checkpointing="full", loss_chunk_tokens=0)),
             ("llama2-1.1b", harness.Variant(attn=best, activation_checkpointing="full", compile=True))]  # fmt: skip
    return rows


def run_child(shape: str, variant: dict, cpu: bool, timeout: float) -> dict:
    """A row from a fresh process; a timeout or a crash becomes the row's `error`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # fmt: skip
    command = [sys.executable, __file__, *(["--cpu-smoke"] if cpu else []), "--child", json.dumps([shape, variant])]
    try:
        child = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s (killed)"}
    line = next((x for x in child.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line:
        return json.loads(line[len("RESULT ") :])
    if "OutOfMemoryError" in child.stderr:
        return {"error": "out of memory"}
    return {"error": (child.stderr.strip().splitlines() or [f"exit status {child.returncode}"])[-1][-300:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="append each row here as one JSON line")
    parser.add_argument("--budget-s", type=float, default=270.0, help="stop starting variants after this long")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, 1+1 steps, on CPU (tests the harness)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cpu = args.cpu_smoke
    sizes = CPU_SMOKE if cpu else {"seq": SEQ, "micro_batch": MICRO_BATCH, "warmup": WARMUP, "timed": TIMED}
    if args.child:
        shape, variant = json.loads(args.child)
        print("RESULT " + json.dumps(run_variant(variant, shape, **sizes)), flush=True)
        return 0
    import torch

    if not cpu and not torch.cuda.is_available():
        print("gpu_throughput: needs a CUDA GPU (or --cpu-smoke)", file=sys.stderr)
        return 2
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    deadline, rows = time.monotonic() + args.budget_s, []
    for shape, variant in variants(available_kernels(cpu), cpu):
        variant = dataclasses.asdict(variant)
        timeout = COMPILE_TIMEOUT_S if variant["compile"] else VARIANT_TIMEOUT_S
        left = deadline - time.monotonic()
        row = {"shape": shape, **variant, "seq": sizes["seq"], "micro_batch": sizes["micro_batch"],
               "date": datetime.date.today().isoformat(), "torch": torch.__version__}  # fmt: skip
        if left < min(timeout, 30):
            row["error"] = f"skipped: {left:.0f} s of the {args.budget_s:.0f} s budget left"
        else:
            row.update(run_child(shape, variant, cpu, min(timeout, left)))
        rows.append(row)
        print(format_row(row), flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    print("\n" + table(rows))
    return 0 if all("error" not in r for r in rows) else 1


def describe(row: dict) -> str:
    extra = [
        *(["compile"] if row.get("compile") else []),
        *(["full logits"] if not row.get("loss_chunk_tokens") else []),
    ]
    return f"{row['shape']}, {row['attn']}, AC {row['activation_checkpointing']}" + "".join(f", {e}" for e in extra)


def format_row(row: dict) -> str:
    if "error" in row:
        return f"{describe(row):<52} {row['error']}"
    mfu = f"{row['mfu']:.1%}" if "mfu" in row else "n/a"
    memory = f"{row['peak_memory_gib']:.1f}" if "peak_memory_gib" in row else "n/a"
    return (f"{describe(row):<52} {row['tokens_per_s']:>9.0f} tok/s  {row['tflops']:>6.1f} TFLOP/s  MFU {mfu:>6}  "
            f"peak {memory} GiB (planned {row['planned_allocated_gib']:.1f})")  # fmt: skip


def table(rows: list[dict]) -> str:
    device = next((r["device"] for r in rows if "device" in r), "?")
    first = rows[0]
    lines = [f"device: {device}; {first['date']}; torch {first['torch']}; seq {first['seq']} packed, micro-batch "
             f"{first['micro_batch']}, {first['mixed_precision']}, {first['stage']} fine-tune",
             "| variant | tokens/s | TFLOP/s | MFU | peak memory (GiB) | planner's estimate (GiB) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {describe(r)} | {r['error']} | | | | |")
            continue
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "n/a"
        memory = f"{r['peak_memory_gib']:.1f}" if "peak_memory_gib" in r else "n/a"
        error = f" ({r['planner_error']:+.0%})" if "planner_error" in r else ""
        lines.append(f"| {describe(r)} | {r['tokens_per_s']:.0f} | {r['tflops']:.1f} | {mfu} | {memory} | "
                     f"{r['planned_allocated_gib']:.1f}{error} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
