"""The training loop: token-normalised loss over the whole global batch, gradient accumulation with sharded gradients,
global gradient-norm clipping, periodic evaluation, metrics. Uses only the verbs of `fsdp`."""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from backbones.loss import cross_entropy_sum
from fsdp import DistEnv, Heartbeat, all_reduce_sum, clip_grad_norm_, is_rank0, set_gradient_sync
from launch.config import TrainConfig
from launch.data import IGNORE_INDEX, GlobalBatchSampler, Mixture, TokenizedData, micro_batch
from launch.flops import FlopCounter
from launch.generation import GenerationEval
from launch.metrics import MetricsWriter, Progress
from launch.profiling import StepProfiler

log = logging.getLogger(__name__)


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor | int], chunk_tokens: int = 0) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over supervised tokens, in fp32; with `chunk_tokens`, the head and
    the loss run over chunks of tokens and no full fp32 logits exist (backbones/loss.py)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if chunk_tokens and hasattr(model, "chunked_loss_sum"):
        return model.chunked_loss_sum(batch["labels"], chunk_tokens, **inputs)
    logits = model(**inputs, use_cache=False).logits
    return cross_entropy_sum(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())


@contextmanager
def steps_collect_garbage(every: int) -> Iterator[None]:
    """With `every` > 0, Python's automatic cyclic collection is off while training and the loop collects the young
    generations every `every` steps, on all ranks at the same step (torchtitan's gc_freq). Left automatic, a full
    collection (~0.4 s among the ~450k objects of a training process) pauses one rank at a time while the others wait
    for it at the next collective: on bench-train's packed CPU run, 0.4-0.8 s per rank in 4 steps of 10 s."""
    if not every or not gc.isenabled():
        yield
        return
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def supervised_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def source_tokens(mixture: Mixture, indices: list[int]) -> list[int]:
    """This rank's supervised tokens per source, then its input tokens per source, for `indices` (global items)."""
    k = len(mixture.names)
    counts = [0] * (2 * k)
    for index in indices:
        i = mixture.source_of(index)
        counts[i] += mixture.supervised_count(index)
        counts[k + i] += int(mixture.lengths[index])
    return counts


@dataclass
class Trainer:
    """The loop and what it uses; everything is built by the caller (`launch.train`)."""

    train: TrainConfig
    env: DistEnv
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: GlobalBatchSampler
    total_steps: int
    train_data: TokenizedData
    eval_data: dict[str, TokenizedData]  # by source name; "" is --data.path's eval split
    pad_id: int
    metrics: MetricsWriter
    layout: str = "padded"  # padded | packed | flat (see launch.data.collate)
    flops: FlopCounter | None = None
    peak_flops: float | None = None  # dense bf16 peak of one device: MFU is logged when known
    heartbeat_s: float = 0.0  # rank 0 names the silent ranks after waiting this long (0: off; fsdp.heartbeat)
    generation: GenerationEval | None = None  # greedy answers to held-out prompts, every `generate_every` steps
    generate_every: int = 0
    profiler: StepProfiler | None = None  # --run.profile_steps
    step: int = field(default=0, init=False)  # optimizer steps completed
    # the metrics of the last evaluation and its step: a checkpoint saved at that step is scored with them
    scores: dict[str, float] = field(default_factory=dict, init=False)
    scores_step: int = field(default=-1, init=False)

    def state_dict(self) -> dict:
        """Everything besides model and optimizer that a resume needs; identical on every rank."""
        return {"step": self.step, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.scheduler.load_state_dict(state["scheduler"])

    def batch(self, data: TokenizedData, indices: list[int]) -> tuple[dict[str, torch.Tensor | int], list[int]]:
        """The micro-batch on the device, and the lengths of its examples (real tokens, no padding)."""
        layout = self.layout if self.layout == "flat" or data.packed else "padded"
        # Under torch.compile, widths come in buckets of 64 so that shapes repeat and nothing recompiles.
        batch, lengths = micro_batch(data.dataset, indices, self.pad_id, layout, bucket=64 if self.train.compile else 1)
        device = self.env.device
        return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}, lengths

    def train_step(self) -> dict:
        """One optimizer step over this rank's share of global batch `self.step`."""
        start = time.perf_counter()
        micro = self.sampler.micro_batches(self.step, self.env.rank, self.env.world_size, self.train.micro_batch_size)
        batches, lengths = zip(*(self.batch(self.train_data, indices) for indices in micro))
        local_tokens = sum(supervised_tokens(b) for b in batches)
        # Real tokens (the examples' own) and the padding computed beside them (none on the flat path).
        local_inputs = sum(n for group in lengths for n in group)
        local_padding = sum(b["input_ids"].numel() for b in batches) - local_inputs
        local_flops = self.flops.step_flops(n for group in lengths for n in group) if self.flops else 0.0
        mixture = self.train_data.dataset if isinstance(self.train_data.dataset, Mixture) else None
        per_source = source_tokens(mixture, [i for indices in micro for i in indices]) if mixture else []
        tokens, inputs, padding, flops, *per_source = all_reduce_sum(
            [local_tokens, local_inputs, local_padding, local_flops, *per_source], self.env.device
        )
        loss_sum = torch.zeros((), device=self.env.device)
        for k, batch in enumerate(batches):
            set_gradient_sync(self.model, last_micro_step=k == len(batches) - 1)
            loss = token_loss_sum(self.model, batch, self.train.loss_chunk_tokens)
            # Divide by the global supervised-token count: gradients are summed over ranks and micro-steps, so the
            # step's gradient is that of (all token losses of the global batch) / (all its supervised tokens).
            (loss / max(tokens, 1.0)).backward()
            loss_sum += loss.detach()
        grad_norm = clip_grad_norm_(self.model.parameters(), self.train.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        (total_loss,) = all_reduce_sum([float(loss_sum)], self.env.device)
        self.step += 1
        elapsed = time.perf_counter() - start
        record = {
            "step": self.step,
            "epoch": round(self.step / self.sampler.steps_per_epoch, 4),  # fractional: 1.0 = one pass over the data
            "loss": total_loss / max(tokens, 1.0),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": int(tokens),
            "input_tokens": int(inputs),
            "padding_tokens": int(padding),
            "tokens_per_s": inputs / elapsed,
            "step_time_s": elapsed,
        }
        if mixture:  # each source's supervised and input tokens in this global batch
            k = len(mixture.names)
            for name, supervised, real in zip(mixture.names, per_source[:k], per_source[k:]):
                record[f"tokens/{name}"], record[f"input_tokens/{name}"] = int(supervised), int(real)
        if flops:
            record["tflops"] = flops / elapsed / self.env.world_size / 1e12  # per device
            if self.peak_flops:
                record["mfu"] = flops / elapsed / (self.peak_flops * self.env.world_size)
        return record

    @torch.no_grad()
    def evaluate(self, data: TokenizedData) -> tuple[float, float]:
        """(summed token loss, supervised tokens) over a whole eval split, all ranks together. Every rank runs the
        same number of forward passes (FSDP gathers are collectives); a rank with no examples left runs a fully masked
        batch."""
        self.model.eval()
        mb, n = self.train.micro_batch_size, len(data.dataset)
        per_round = mb * self.env.world_size
        loss_sum, token_sum = 0.0, 0
        for start in range(0, n, per_round):
            lo = start + self.env.rank * mb
            indices = list(range(lo, min(lo + mb, n)))
            batch, _ = self.batch(data, indices or [0])
            if not indices:
                batch["labels"].fill_(IGNORE_INDEX)
            loss_sum += float(token_loss_sum(self.model, batch, self.train.loss_chunk_tokens))
            token_sum += supervised_tokens(batch)
        self.model.train()
        total_loss, total_tokens = all_reduce_sum([loss_sum, token_sum], self.env.device)
        return total_loss, total_tokens

    def fit(self, on_step_end: Callable[[Trainer], None] | None = None) -> None:
        """Train to `total_steps`. `on_step_end` (checkpointing, signals) runs after every step; it stops training
        by raising."""
        eval_every = self.train.eval_every
        evaluating = bool(self.eval_data) and eval_every >= 0
        generating = self.generation is not None and self.generate_every > 0
        bar = Progress(self.total_steps, self.step, is_rank0(), self.train.log_every_s, self.train.log_every_steps)
        gc_every = self.train.gc_every_steps
        heartbeat = Heartbeat(self.heartbeat_s)
        profiler = self.profiler or StepProfiler(None)
        with steps_collect_garbage(gc_every):
            try:
                if (evaluating or generating) and self.step == 0:
                    self.log_eval(evaluating, generating)
                while self.step < self.total_steps:
                    heartbeat.at(self.step + 1, 0)
                    profiler.before(self.step + 1)
                    record = self.train_step()
                    profiler.after(self.step)
                    self.metrics.log(record)
                    bar.step(record)
                    last = self.step == self.total_steps
                    loss_due = evaluating and ((eval_every and self.step % eval_every == 0) or last)
                    generate_due = generating and (self.step % self.generate_every == 0 or last)
                    if loss_due or generate_due:
                        self.log_eval(loss_due, generate_due)
                    if gc_every and self.step % gc_every == 0:
                        gc.collect(1)
                    heartbeat.at(self.step, 1)
                    if on_step_end is not None:
                        on_step_end(self)
            finally:
                profiler.close()
                heartbeat.stop()
                bar.close()

    def log_eval(self, loss: bool = True, generate: bool = False) -> None:
        """One evaluation record: with `loss`, eval_loss over every eval split together (token-weighted) and, with a
        mixture's sources, each one's as eval_loss/NAME; with `generate`, the generation scores (launch.generation)."""
        record: dict = {"step": self.step}
        said = []
        if loss:
            results = {name: self.evaluate(data) for name, data in self.eval_data.items()}
            loss_sum, tokens = (sum(values) for values in zip(*results.values()))
            eval_loss = loss_sum / max(tokens, 1.0)
            perplexity = math.exp(min(eval_loss, 50))
            record.update({"eval_loss": eval_loss, "eval_perplexity": perplexity})
            record.update({f"eval_loss/{name}": s / max(n, 1.0) for name, (s, n) in results.items() if name})
            per_source = "".join(f", {name} {s / max(n, 1.0):.4f}" for name, (s, n) in results.items() if name)
            said.append(f"eval loss {eval_loss:.4f} (perplexity {perplexity:.2f}){per_source}")
        if generate:
            record.update(self.generation(self.model, self.env.rank, self.env.world_size))
            said.append(f"generation: exact match {record['gen_exact_match']:.1%}, contains "
                        f"{record['gen_contains']:.1%}, {record['gen_length']:.1f} tokens")  # fmt: skip
        self.metrics.log(record)
        self.scores = {k: v for k, v in record.items() if k in ("eval_loss", "gen_exact_match", "gen_contains")}
        self.scores_step = self.step
        log.info("step %d: %s", self.step, "; ".join(said))
