"""Generation evals inside the run: greedy answers to held-out prompts from the sharded model, scored against the
references the data gives (`--eval.generate_every`).

The prompts are the first `--eval.generate_count` held-out examples of each eval source (the eval split, each
mixture source's eval data, or `--eval.generate_path`), read from the tokenization cache: a prompt is an example's ids
up to its last answer, the reference that answer's ids without the end-of-turn token. Rank r decodes prompts r, r + W,
... Every rank runs the same number of forward passes, since FSDP's gathers are collectives: all of a rank's
unfinished prompts go in one padding-free (flash kernels) or right-padded (SDPA) batch per new token, with no KV cache
(torch_varlen has none), and a rank whose prompts are done runs a one-token batch until every rank is done. Decoding
stops at the family's end-of-turn token or EOS, or after `--eval.max_new_tokens`.

Scores: exact match (the stripped texts are equal), containment (the reference occurs in the generation, ignoring
case) and the mean generated length in tokens, overall and per source; a few samples are logged with them. Nothing
of the training trajectory changes: the model is back in train mode and the RNG state as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fsdp import all_gather_object, all_reduce_sum, is_rank0
from launch.data import IGNORE_INDEX, TokenizedData, micro_batch


@dataclass
class HeldOut:
    source: str  # "" for --data.path's eval split
    prompt: list[int]
    reference: list[int]


def held_out(eval_data: dict[str, TokenizedData], count: int, stop_ids: set[int]) -> list[HeldOut]:
    """The first `count` examples with an answer of every eval source, split into prompt and reference."""
    out = []
    for name, data in eval_data.items():
        examples, taken = data.examples, 0
        for index in range(len(examples)):
            if taken == count:
                break
            item = split_at_last_answer(examples[index], stop_ids)
            if item is not None:
                out.append(HeldOut(name, *item))
                taken += 1
    return out


def split_at_last_answer(example: dict, stop_ids: set[int]) -> tuple[list[int], list[int]] | None:
    """(ids before the last supervised run, that run without a trailing end-of-turn token); None without one."""
    ids, labels = example["input_ids"], example["labels"]
    supervised = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if not supervised:
        return None
    end = supervised[-1] + 1
    start = end - 1
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    if start == 0:  # supervised from the first token (a text document): no prompt to answer
        return None
    reference = ids[start:end]
    if reference and reference[-1] in stop_ids:
        reference = reference[:-1]
    return ids[:start], reference


@torch.no_grad()
def greedy(model: nn.Module, prompts: list[list[int]], stop_ids: set[int], max_new_tokens: int, pad_id: int,
           layout: str, device: torch.device) -> list[list[int]]:  # fmt: skip
    """This rank's greedy continuations, in lockstep with every other rank (see the module's docstring)."""
    out: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    for _ in range(max_new_tokens):
        (remaining,) = all_reduce_sum([float(len(active))], device)
        if not remaining:
            break
        sequences = [prompts[i] + out[i] for i in active] or [[pad_id]]
        items = [{"input_ids": s, "labels": s} for s in sequences]
        batch, lengths = micro_batch(items, range(len(items)), pad_id, layout)
        width = batch["input_ids"].shape[1]
        ends = torch.tensor(lengths).cumsum(0) - 1 if layout == "flat" else \
            torch.arange(len(lengths)) * width + torch.tensor(lengths) - 1  # fmt: skip
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items() if k != "labels"}
        next_ids = last_token_logits(model, ends.to(device), inputs).argmax(-1).tolist()
        still = []
        for i, token in zip(active, next_ids):
            if token in stop_ids:
                continue
            out[i].append(token)
            if len(out[i]) < max_new_tokens:
                still.append(i)
        active = still
    return out


def last_token_logits(model: nn.Module, positions: torch.Tensor, inputs: dict) -> torch.Tensor:
    if hasattr(model, "last_token_logits"):  # the head on those rows only (backbones/loss.py)
        return model.last_token_logits(positions, **inputs)
    return model(**inputs, use_cache=False).logits.flatten(0, 1)[positions].float()


class GenerationEval:
    """Called at an eval step: decodes every held-out prompt across the ranks and returns the metrics record's
    fields (every rank gets the same), with `samples` generations on rank 0."""

    def __init__(self, prompts: list[HeldOut], tokenizer, stop_ids: set[int], max_new_tokens: int, layout: str,
                 device: torch.device, samples: int = 4) -> None:  # fmt: skip
        self.prompts, self.tokenizer, self.stop_ids = prompts, tokenizer, stop_ids
        self.max_new_tokens, self.layout, self.device, self.samples = max_new_tokens, layout, device, samples
        self.pad_id = tokenizer.pad_token_id

    def __call__(self, model: nn.Module, rank: int, world_size: int) -> dict:
        mine = list(range(rank, len(self.prompts), world_size))
        state = torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        training = model.training
        model.eval()
        try:
            generated = greedy(model, [self.prompts[i].prompt for i in mine], self.stop_ids, self.max_new_tokens,
                               self.pad_id, self.layout, self.device)  # fmt: skip
        finally:
            model.train(training)
            torch.set_rng_state(state[0])
            if state[1] is not None:
                torch.cuda.set_rng_state(state[1], self.device)
        results: dict[int, list[int]] = {}
        for part in all_gather_object(list(zip(mine, generated))):
            results.update(part)
        return self.score([results[i] for i in range(len(self.prompts))])

    def score(self, generated: list[list[int]]) -> dict:
        decode = self.tokenizer.decode
        rows = []
        for item, ids in zip(self.prompts, generated):
            text = decode(ids, skip_special_tokens=True).strip()
            reference = decode(item.reference, skip_special_tokens=True).strip()
            rows.append((item.source, text == reference, reference.casefold() in text.casefold(), len(ids), item, text))
        record = summarise(rows, "")
        for source in sorted({r[0] for r in rows} - {""}):
            record.update(summarise([r for r in rows if r[0] == source], f"/{source}"))
        if is_rank0() and self.samples:
            record["gen_samples"] = [{"source": item.source, "prompt": decode(item.prompt[-200:]),
                                      "reference": decode(item.reference, skip_special_tokens=True), "generated": text}
                                     for *_, item, text in rows[: self.samples]]  # fmt: skip
        return record


def summarise(rows: list[tuple], suffix: str) -> dict:
    n = max(1, len(rows))
    return {
        f"gen_exact_match{suffix}": sum(r[1] for r in rows) / n,
        f"gen_contains{suffix}": sum(r[2] for r in rows) / n,
        f"gen_length{suffix}": sum(r[3] for r in rows) / n,
    }
