"""`make smoke`: the one-minute end-to-end check before a cluster-day.

Builds the tiny model and bundled data, runs `torchrun --nproc_per_node=2 -m launch.train --config
recipes/tiny-full.yaml` on CPU with the launcher's own generation evals (exact match on held-out prompts before
training, every 100 steps and at the end, drawn in loss.png), then loads `final/` with plain transformers and
generates an answer. Exits non-zero unless eval loss fell clearly and exact match rose.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from backbones import build_backbone
from backbones.prompting import PromptBuilder
from backbones.registry import prompt_builder_of
from backbones.tiny import ensure_tiny_model
from launch.bundled_data import bundled_path
from launch.data import encode_prompt
from launch.data.conversation import chat_conversation
from launch.metrics import setup_logging

BACKBONE = "llama2-tiny-chat"


def held_out_prompts(n: int, tokenizer) -> list[tuple[list[int], str, str]]:
    """(prompt token ids up to the answer, the prompt's text, expected answer) for the first user turn of held-out eval
    conversations, encoded exactly as training encodes them."""
    builder: PromptBuilder = prompt_builder_of(BACKBONE)
    rows = [json.loads(line) for line in bundled_path("chat", "eval").read_text().splitlines()][:n]
    prompts = []
    for i, row in enumerate(rows):
        conversation = chat_conversation(row, "messages", f"eval row {i}")
        # Up to the answer, trailing space dropped: the answer's space belongs to its first token (`▁Lima`).
        prompt = builder.build(conversation.turns[:1], system=conversation.system).until_answer(0)
        prompts.append((encode_prompt(prompt, tokenizer)[0], prompt.text, conversation.turns[0][1]))
    return prompts


@torch.no_grad()
def generate(model, tokenizer, ids: list[int], max_new_tokens: int = 8) -> str:
    inputs = torch.tensor([ids])
    out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--recipe", default="recipes/tiny-full.yaml", help="e.g. recipes/tiny-lora.yaml")
    parser.add_argument("--output-dir", default="runs/smoke")
    parser.add_argument("--max-steps", type=int, default=None, help="override the recipe's train.max_steps")
    parser.add_argument("--prompts", type=int, default=32, help="held-out prompts the generation evals decode")
    parser.add_argument("--generate-every", type=int, default=100, help="steps between generation evals")
    args = parser.parse_args()
    start = time.time()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    setup_logging(is_rank0=True)
    print(f"[smoke] tiny model: {ensure_tiny_model()}", flush=True)
    base = build_backbone(BACKBONE, load_weights=False)
    prompts = held_out_prompts(1, base.tokenizer)  # one, to generate from final/ with plain transformers

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.nproc}",
        "-m",
        "launch.train",
        "--config",
        args.recipe,
        "--run.output_dir",
        args.output_dir,
        "--run.overwrite",
        "true",
        "--run.resume",
        "never",
        "--eval.generate_every",
        str(args.generate_every),
        "--eval.generate_count",
        str(args.prompts),
        "--eval.max_new_tokens",
        "8",
    ]
    command += ["--train.max_steps", str(args.max_steps)] if args.max_steps else []
    print("[smoke] " + " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})

    final = Path(args.output_dir) / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    model.eval()
    records = [json.loads(line) for line in (Path(args.output_dir) / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    exact = [r["gen_exact_match"] for r in records if "gen_exact_match" in r]
    ids, text, answer = prompts[0]
    print(
        f"\n[smoke] held-out prompt: {text!r}\n[smoke] expected: {answer!r}  generated from final/: "
        f"{generate(model, tokenizer, ids)!r}"
    )
    print(f"[smoke] eval loss     before {evals[0]:.4f}  after {evals[-1]:.4f}")
    print(f"[smoke] exact match   before {exact[0]:.1%}  after {exact[-1]:.1%}  ({args.prompts} held-out prompts, "
          f"greedy, in the run: {' -> '.join(f'{e:.0%}' for e in exact)})")  # fmt: skip
    print(f"[smoke] {time.time() - start:.0f} s in all")
    if not evals[-1] < 0.5 * evals[0]:
        print("[smoke] FAILED: eval loss did not fall clearly", file=sys.stderr)
        return 1
    if not exact[-1] > exact[0]:
        print("[smoke] FAILED: exact match did not rise", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
