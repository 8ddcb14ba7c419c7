"""`make bench-train`: training throughput against the peers, side by side, and the chunked loss's memory.

Everyone trains the same LLaMA-2-shaped ~27M-parameter model (the tiny tokenizer, random weights saved once as a
Hugging Face directory) on the bundled chat data, fp32, 2 gloo processes, AdamW, the same global batches (shardtune's
seeded sampler decides them; every contestant takes the same examples per step), and is timed per optimizer step
after warm-up. Rounds alternate the contestants' order; the table gives the median over rounds and the spread.

  shardtune padded / packed   python -m launch.train (defaults: chunked loss, foreach AdamW), SDPA
  minimal padded / packed     a hand-written FSDP2 loop: fully_shard per block + root, full logits, AdamW
  hf-fsdp2 padded / flat      transformers' Trainer with accelerate's FSDP2 plugin (fsdp_version 2, LlamaDecoderLayer
                              auto-wrap), padded (DataCollatorForSeq2Seq) or padding-free (DataCollatorWithFlattening)
  hf-default flat             the Trainer as it runs on CPU with no FSDP config (DDP: every rank holds everything)

shardtune's padding-free layout needs a flash kernel (CUDA): on CPU it falls back to SDPA, so that row is GPU-only.
Throughput is real tokens (no padding) per second; "supervised" counts the tokens the loss is taken on.

Then the memory of one training step at seq 2048 of the same model with LLaMA-2's 32k vocabulary (torch's MemTracker:
the tensors alive at the step's peak, weights excluded), full logits against the chunked loss, with activation
checkpointing per block (as the 7B and 13B recipes run) and without.

The ranks run tests/bench/train_workers.py (the minimal loop, the HF Trainer, the pairing) or `launch.train`.

    python tests/bench/bench_train.py [--rounds 3] [--steps 7] [--warmup 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from train_workers import (  # noqa: E402  (after the sys.path insertion above)
    CONTESTANTS,
    GLOBAL_BATCH,
    LOSS_CHUNK,
    LR,
    MAX_LENGTH,
    MICRO_BATCH,
    SEED,
    SHAPE,
    shared_data,
)

WORKERS = Path(__file__).with_name("train_workers.py")


def build_model_dir(directory: Path) -> Path:
    """The benchmark model with the tiny tokenizer plus <PAD>, vocabulary padded to 64: shardtune changes nothing."""
    if (directory / "config.json").is_file():
        return directory
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from backbones.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=-(-len(tokenizer) // 64) * 64, **SHAPE))
    model.config.pad_token_id = tokenizer.pad_token_id
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".bench-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.rename(tmp, directory)
    return directory


def real_tokens(example: dict) -> int:
    return sum(example.get("lengths") or [len(example["input_ids"])])


def supervised(example: dict) -> int:
    return sum(1 for label in example["labels"][1:] if label != -100)


def step_tokens(data, sampler, steps: int) -> list[tuple[int, int]]:
    """(real, supervised) tokens of each global batch."""
    batches = [[data.dataset[i] for i in sampler.global_batch(s)] for s in range(steps)]
    return [(sum(map(real_tokens, b)), sum(map(supervised, b))) for b in batches]


def loss_memory_mib(chunk_tokens: int, checkpointing: bool) -> dict[str, float]:
    """Memory of one training step at seq 2048 with a 32k vocabulary (fp32), with or without activation checkpointing
    per decoder block (the 7B and 13B recipes checkpoint every block): torch's MemTracker counts the tensors alive at
    the step's peak by kind (activations, temporaries, gradients) beside the weights, exactly, unlike process RSS."""
    from types import MethodType

    import torch
    from torch.distributed._composable import checkpoint
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import LlamaConfig, LlamaForCausalLM

    from backbones.loss import causal_lm_loss_sum
    from launch.trainer import token_loss_sum

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32064, **SHAPE, attn_implementation="sdpa"))
    model.chunked_loss_sum = MethodType(causal_lm_loss_sum, model)
    if checkpointing:
        for block in model.model.layers:
            checkpoint(block)
    ids = torch.randint(3, 32000, (1, 2048))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        token_loss_sum(model, batch, chunk_tokens).backward()
    (peak,) = tracker.get_tracker_snapshot("peak").values()
    kinds = {str(kind).rsplit(".", 1)[-1].lower(): n / 2**20 for kind, n in peak.items()}
    return {"step": kinds["total"] - kinds.get("param", 0.0), "weights": kinds.get("param", 0.0)}


def shardtune_args(model_dir: Path, packing: bool, steps: int, run: Path, extra: list[str]) -> list[str]:
    return ["--config", "recipes/tiny-full.yaml", "--model.path", str(model_dir), "--data.max_length",
            str(MAX_LENGTH[packing]), "--data.packing", str(packing).lower(),
            "--train.global_batch_size", str(GLOBAL_BATCH), "--train.micro_batch_size", str(MICRO_BATCH),
            "--train.max_steps", str(steps), "--train.lr", str(LR), "--train.schedule", "constant",
            "--train.warmup_ratio", "0", "--train.eval_every", "-1", "--fsdp.mixed_precision", "fp32",
            "--run.seed", str(SEED), "--run.output_dir", str(run), "--checkpoint.every_minutes", "0",
            "--run.resume", "never", *extra]  # fmt: skip


def interleaved(model_dir: Path, packing: bool, steps: int, out: Path, extra: list[str], nproc: int = 2) -> dict:
    """shardtune and the minimal loop step by step in one torchrun job (see interleaved_worker): per-step times."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = shardtune_args(model_dir, packing, steps, out.parent / f"{out.name}-run", extra)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKERS),
               "--worker", "interleaved", "--model-dir", str(model_dir), "--out", str(out),
               "--layout", "packed" if packing else "padded", "--shardtune-argv", json.dumps(args)]  # fmt: skip
    subprocess.run(command, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(nproc)]
    # A step ends when the slowest rank's does: the ranks' mean, as for the separate runs.
    return {name: [statistics.mean(t) for t in zip(*(r[name] for r in ranks))] for name in ("shardtune", "minimal")}


def launch(contestant: str, model_dir: Path, steps: int, out: Path, extra: list[str], nproc: int = 2) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    family, layout = contestant.rsplit("-", 1)
    packing = layout == "packed"
    if family == "shardtune":
        run = out.parent / f"{out.name}-run"
        command = [*torchrun, "-m", "launch.train", *shardtune_args(model_dir, packing, steps, run, extra)]
        subprocess.run(command, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if "step_time_s" in r]
        # Wall time from step end to step end, as the other loops are timed: metrics, checks and hooks included.
        times = [steps[0]["step_time_s"]] + [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(steps, steps[1:])]
        summary = json.loads((run / "summary.json").read_text())
        return [{"rank": r, "step_s": times, "peak_mib": summary["peak_memory_gib_per_rank"][r] * 1024}
                for r in range(nproc)]  # fmt: skip
    worker = ["--worker", family, "--model-dir", str(model_dir), "--steps", str(steps), "--out", str(out),
              "--layout", layout]  # fmt: skip
    subprocess.run([*torchrun, str(WORKERS), *worker], check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)  # fmt: skip
    return [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(nproc)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    parser.add_argument("--only", nargs="*", choices=CONTESTANTS, default=list(CONTESTANTS))
    parser.add_argument(
        "--shardtune-flags", default="", help="more flags for shardtune's runs, e.g. '--train.compile true'"
    )
    parser.add_argument(
        "--interleaved-steps",
        type=int,
        default=12,
        help="steps of the step-by-step shardtune/minimal pairing per layout (0: skip it)",
    )
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from backbones.tiny import cache_root

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    model_dir = build_model_dir(root / "bench-llama-27m")
    tokens = {packing: step_tokens(*shared_data(str(model_dir), packing)[1:], args.steps) for packing in (False, True)}
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    load_before = os.getloadavg()
    results: dict[str, list[dict]] = {c: [] for c in args.only}
    for round_ in range(args.rounds):
        order = args.only[round_ % len(args.only) :] + args.only[: round_ % len(args.only)]
        for contestant in order:
            ranks = launch(
                contestant, model_dir, args.steps, tmp / f"{contestant}-{round_}", args.shardtune_flags.split()
            )
            real, sup = map(sum, zip(*tokens[contestant.endswith("packed")][args.warmup :]))
            seconds = statistics.mean(sum(r["step_s"][args.warmup :]) for r in ranks)
            results[contestant].append({"real": real / seconds, "supervised": sup / seconds,
                                        "peak_mib": max(r["peak_mib"] for r in ranks),
                                        "wrapped": ranks[0].get("wrapped")})  # fmt: skip
            print(json.dumps({"round": round_, "contestant": contestant, **results[contestant][-1]}), flush=True)
    pairs = {}
    if args.interleaved_steps:
        for packing in (True, False):
            layout = "packed" if packing else "padded"
            pairs[layout] = interleaved(model_dir, packing, args.interleaved_steps, tmp / f"interleaved-{layout}",
                                        args.shardtune_flags.split())  # fmt: skip
            print(json.dumps({"interleaved": layout, **pairs[layout]}), flush=True)
    load_after = os.getloadavg()

    memory = {(chunk, ckpt): loss_memory_mib(chunk, ckpt) for ckpt in (True, False) for chunk in (0, LOSS_CHUNK)}

    results = {c: rs for c, rs in results.items() if rs}  # --rounds 0: only the interleaved pairs and memory
    median = {c: statistics.median(r["real"] for r in rs) for c, rs in results.items()}
    loads = [", ".join(f"{v:.2f}" for v in load) for load in (load_before, load_after)]
    print(f"\n{len(results)} contestants x {args.rounds} rounds, {args.steps} steps each ({args.warmup} warm-up steps "
          f"not timed), global batch {GLOBAL_BATCH}, 2 gloo processes, fp32; load average (1, 5, 15 min) "
          f"{loads[0]} before, {loads[1]} after\n")  # fmt: skip
    print("| contestant | real tokens/s (median) | spread (min-max) | supervised tokens/s | peak RSS/rank (MiB) "
          "| ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for contestant, rs in results.items():
        ref = {"shardtune-padded": "minimal-padded", "shardtune-packed": "minimal-packed"}.get(contestant)
        ratio = f"{median[contestant] / median[ref]:.2f}x {ref}" if ref in median else ""
        real, sup = [r["real"] for r in rs], statistics.median(r["supervised"] for r in rs)
        print(f"| {contestant} | {median[contestant]:.0f} | {min(real):.0f}-{max(real):.0f} | {sup:.0f} | "
              f"{max(r['peak_mib'] for r in rs):.0f} | {ratio} |")  # fmt: skip
    hf = [c for c in median if c.startswith("hf-fsdp2")]
    if hf and "shardtune-packed" in median:
        best = max(hf, key=median.get)
        print(f"\nshardtune packed / HF Trainer's best FSDP2 configuration ({best}): "
              f"{median['shardtune-packed'] / median[best]:.2f}x")  # fmt: skip
    for contestant in hf + [c for c in median if c.startswith("hf-default")]:
        print(f"{contestant}: the Trainer's model was wrapped in {results[contestant][0]['wrapped']}")
    if pairs:
        print(
            f"\nshardtune and the minimal loop taking turns step by step in one job (same global batches; the "
            f"first {args.warmup} pairs not timed; shardtune's step includes its metrics and step-end collective):\n"
        )
        print("| layout | pairs | shardtune s/step (median) | minimal s/step (median) | shardtune speed / minimal, all "
              "steps | per pair: median (min-max) |")  # fmt: skip
        print("|---|---|---|---|---|---|")
        for layout, times in pairs.items():
            ours, theirs = times["shardtune"][args.warmup - 1 :], times["minimal"][args.warmup :]
            ratios = [m / o for o, m in zip(ours, theirs)]  # equal tokens per step: time ratio = speed ratio
            print(f"| {layout} | {len(ratios)} | {statistics.median(ours):.2f} | {statistics.median(theirs):.2f} | "
                  f"{sum(theirs) / sum(ours):.3f}x | {statistics.median(ratios):.3f}x ({min(ratios):.2f}-"
                  f"{max(ratios):.2f}) |")  # fmt: skip
    print(f"\none training step of the same model at seq 2048 with LLaMA-2's vocabulary (32064), fp32, one process; "
          f"the weights ({memory[0, True]['weights']:.0f} MiB) not counted:\n")  # fmt: skip
    print(f"| activation checkpointing | step memory, full logits (MiB) | chunked loss, {LOSS_CHUNK} tokens a chunk "
          f"(MiB) | lower by |")  # fmt: skip
    print("|---|---|---|---|")
    for checkpointing in (True, False):
        full, chunked = (memory[c, checkpointing]["step"] for c in (0, LOSS_CHUNK))
        label = "every block (as the 7B/13B recipes)" if checkpointing else "none"
        print(f"| {label} | {full:.0f} | {chunked:.0f} | {full / chunked:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
