"""`make gpu-check`'s throughput table: a LLaMA-2-shaped ~1.1B model (22 layers, d 2048, 32 heads, ffn 5632, vocab
32064, random init) fine-tuned in full at seq 4096, packed, bf16 over fp32 master weights, for each attention kernel
that runs here, with and without activation checkpointing: 5 warm-up and 20 timed steps each, in a fresh process.
Reports tokens/s, TFLOP/s and MFU (FLOPs as launch/flops.py counts them) and peak CUDA memory, as a table and JSON.

    python tests/bench/gpu_throughput.py --out gpu-check/throughput.json
    python tests/bench/gpu_throughput.py --cpu-smoke     # the harness itself on CPU, tiny shape (make test runs it)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

KERNELS = ("flash_attention_2", "torch_varlen", "sdpa")


def run_variant(variant: dict, shape: str, seq: int, micro_batch: int, warmup: int, timed: int) -> dict:
    """One row, in this process: build, train, measure."""
    import harness
    import torch

    from fsdp import init_distributed, read_env, teardown

    env = read_env()
    init_distributed(env)
    try:
        v = harness.Variant(**variant)
        dims = harness.LLAMA_1B if shape == "1b" else harness.TINY_SHAPE
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shape, 1+1 steps, on CPU (tests the harness)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cpu = args.cpu_smoke
    shape, seq, micro, warmup, timed = ("tiny", 128, 2, 1, 1) if cpu else ("1b", 4096, 4, 5, 20)
    if args.child:
        print("RESULT " + json.dumps(run_variant(json.loads(args.child), shape, seq, micro, warmup, timed)), flush=True)
        return 0
    import torch

    if not cpu and not torch.cuda.is_available():
        print("gpu_throughput: needs a CUDA GPU (or --cpu-smoke)", file=sys.stderr)
        return 2
    rows = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # fmt: skip
    for variant in variants(available_kernels(cpu), cpu):
        if True:
            variant = dataclasses.asdict(variant)
            command = [sys.executable, __file__, *(["--cpu-smoke"] if cpu else []), "--child", json.dumps(variant)]
            child = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
            line = next((x for x in child.stdout.splitlines() if x.startswith("RESULT ")), None)
            row = {**variant, "seq": seq, "micro_batch": micro}
            if line:
                row.update(json.loads(line[len("RESULT ") :]))
            else:
                oom = "OutOfMemoryError" in child.stderr
                row["error"] = "out of memory" if oom else (child.stderr.strip().splitlines() or ["failed"])[-1]
            rows.append(row)
            print(format_row(row), flush=True)
    report = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "rows": rows}
    print("\n" + table(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all("error" not in r for r in rows) else 1


def variants(kernels: list[str], cpu: bool) -> list:
    """Every kernel without and with full checkpointing; then, on the best kernel, selective checkpointing, compile,
    and the full-logits loss (the chunked loss is the default)."""
    import harness

    precision = "fp32" if cpu else "bf16"
    if cpu:
        return [harness.Variant(attn="sdpa", mixed_precision=precision)]
    rows = [harness.Variant(attn=k, activation_checkpointing=ac, mixed_precision=precision)
            for k in kernels for ac in ("none", "full")]  # fmt: skip
    best = kernels[0]
    rows += [harness.Variant(attn=best, activation_checkpointing="selective"),
             harness.Variant(attn=best, activation_checkpointing="full", compile=True),
             harness.Variant(attn=best, activation_checkpointing="full", loss_chunk_tokens=0)]  # fmt: skip
    return rows


def describe(row: dict) -> str:
    extra = [
        *(["compile"] if row.get("compile") else []),
        *(["full logits"] if not row.get("loss_chunk_tokens") else []),
    ]
    return f"{row['attn']}, AC {row['activation_checkpointing']}" + "".join(f", {e}" for e in extra)


def format_row(row: dict) -> str:
    if "error" in row:
        return f"{describe(row):<42} {row['error']}"
    mfu = f"{row['mfu']:.1%}" if "mfu" in row else "n/a"
    memory = f"{row['peak_memory_gib']:.1f}" if "peak_memory_gib" in row else "n/a"
    return (f"{describe(row):<42} {row['tokens_per_s']:>9.0f} tok/s  {row['tflops']:>6.1f} TFLOP/s  MFU {mfu:>6}  "
            f"peak {memory} GiB (planned {row['planned_allocated_gib']:.1f})")  # fmt: skip


def table(rows: list[dict]) -> str:
    device = next((r["device"] for r in rows if "device" in r), "?")
    first = rows[0]
    lines = [f"device: {device}; seq {first['seq']} packed, micro-batch {first['micro_batch']}, "
             f"{first['mixed_precision']}, {first['stage']} fine-tune",
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
