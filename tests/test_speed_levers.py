"""Speed and memory levers, in one process: the chunked loss equals the full-logits loss in value and gradients,
activation checkpointing orders activation memory full < selective < none, best-fit packing leaves under 2% padding
on the bundled data, length-sorted micro-batches leave the loss exact, and the tokenization cache is built once when
two ranks start together."""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from backbones import build_backbone
from backbones.loss import chunked_cross_entropy_sum
from fsdp import apply_parallelism, build_mesh
from fsdp.materialize import materialize
from launch.config import DataConfig
from launch.data import GlobalBatchSampler, build_tokenized, collate, plan_packing
from launch.trainer import token_loss_sum


@pytest.fixture
def sharded_tiny(process_group):
    backbone = build_backbone("llama2-tiny-chat", load_weights=False)
    model = apply_parallelism(backbone.llm, backbone.transformer_layer_cls, build_mesh(process_group, "full"),
                              param_dtype=None)  # fmt: skip
    materialize(model, process_group.device)
    backbone.init_non_persistent_buffers()
    from fsdp.materialize import load_from_rank0

    load_from_rank0(model, backbone.pretrained_weights(), process_group.device)
    return backbone, model


def gradients(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.full_tensor().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_chunked_loss_equals_full_logits_in_value_and_gradients(sharded_tiny):
    backbone, model = sharded_tiny
    data = build_tokenized(DataConfig(path="bundled", format="chat", max_length=128), backbone, "train")
    batch = collate([data.dataset[i] for i in range(6)], backbone.tokenizer.pad_token_id, "padded")
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    results = {}
    for chunk in (0, 16):  # 0: transformers' full logits; 16 tokens a chunk: many chunks
        model.zero_grad(set_to_none=True)
        loss = token_loss_sum(model, batch, chunk) / tokens  # normalised as the trainer normalises it
        loss.backward()
        results[chunk] = (loss.detach(), gradients(model))
    (full_loss, full_grads), (chunked_loss, chunked_grads) = results[0], results[16]
    torch.testing.assert_close(chunked_loss, full_loss, rtol=0, atol=1e-5)
    assert full_grads.keys() == chunked_grads.keys() and "lm_head.weight" in full_grads
    for name in full_grads:
        torch.testing.assert_close(chunked_grads[name], full_grads[name], rtol=0, atol=1e-5, msg=name)


def test_chunks_of_ignored_labels_are_skipped_and_cost_nothing():
    hidden = torch.randn(40, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    labels = torch.full((40,), -100)
    labels[5], labels[33] = 3, 7
    full = torch.nn.functional.cross_entropy(hidden @ weight.T, labels, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(chunked_cross_entropy_sum(hidden, weight, labels, 8), full)


def activation_mib(mode: str) -> float:
    """Resident memory a forward pass adds (the activations kept for backward) under one checkpointing mode."""
    torch.manual_seed(0)
    shape = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=256)  # fmt: skip
    model = LlamaForCausalLM(LlamaConfig(**shape, attn_implementation="sdpa"))
    if mode != "none":
        from torch.distributed._composable import checkpoint

        from fsdp.parallelize import selective_context

        for block in (m for m in model.modules() if isinstance(m, LlamaDecoderLayer)):
            checkpoint(block, **({"context_fn": selective_context} if mode == "selective" else {}))
    ids = torch.randint(0, 256, (8, 512))
    before = trimmed_rss_mib()
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state  # graph and saved tensors alive here
    kept = trimmed_rss_mib() - before  # freed temporaries of the forward go back first: only what is kept counts
    hidden.sum().backward()
    return kept


def trimmed_rss_mib() -> float:
    """Resident memory once freed heap pages are handed back, so that a freed temporary does not count as kept."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


@pytest.mark.slow
def test_activation_checkpointing_keeps_full_less_than_selective_less_than_none():
    memory = {mode: activation_mib(mode) for mode in ("none", "selective", "full")}
    assert memory["full"] < memory["selective"] < memory["none"], memory
    assert memory["full"] < 0.5 * memory["none"], memory


def test_best_fit_packing_leaves_under_2_percent_padding_on_the_bundled_data(tiny_backbone):
    data = build_tokenized(DataConfig(path="bundled", format="chat", max_length=512, packing=True), tiny_backbone,
                           "train")  # fmt: skip
    assert data.padding_fraction <= 0.02, data.padding_fraction
    rows = [data.dataset[i] for i in range(len(data.dataset))]
    assert all(len(r["input_ids"]) == 512 and sum(r["lengths"]) <= 512 for r in rows)
    assert sum(len(r["lengths"]) for r in rows) == 2000  # every example exactly once


def test_plan_packing_is_seeded_and_fills_bins_best_first():
    lengths = [5, 3, 8, 2, 7, 1, 4, 6]
    bins = plan_packing(lengths, 10, seed=1)
    assert sorted(i for b in bins for i in b) == list(range(8)) and all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 4  # 36 tokens in bins of 10: the fewest possible
    assert plan_packing(lengths, 10, seed=1) == bins


def test_length_sorted_micro_batches_leave_the_loss_exact(sharded_tiny):
    backbone, model = sharded_tiny
    data = build_tokenized(DataConfig(path="bundled", format="alpaca", max_length=128), backbone, "train")
    lengths = data.dataset.lengths
    plain, sorted_ = GlobalBatchSampler(len(lengths), 16, 3), GlobalBatchSampler(len(lengths), 16, 3, lengths)
    pad = backbone.tokenizer.pad_token_id
    losses, widths = [], []
    with torch.no_grad():
        for sampler in (plain, sorted_):
            micro = sampler.micro_batches(0, 0, 1, 4)
            batches = [collate([data.dataset[i] for i in mb], pad, "padded") for mb in micro]
            losses.append(sum(float(token_loss_sum(model, b)) for b in batches))
            widths.append(sum(b["input_ids"].numel() for b in batches))
    assert sorted(sum(plain.micro_batches(0, 0, 1, 4), [])) == sorted(sum(sorted_.micro_batches(0, 0, 1, 4), []))
    assert losses[1] == pytest.approx(losses[0], abs=1e-4) and widths[1] < widths[0]  # same loss, less padding


def build_in_process(path: str, home: str, model: str, queue) -> None:
    import os

    os.environ["SHARDTUNE_HOME"] = home
    backbone = build_backbone("llama2-tiny-chat", path=model, load_weights=False)
    data = build_tokenized(DataConfig(path=path, format="chat", max_length=64), backbone, "train")
    queue.put(data.from_cache)


@pytest.mark.slow
def test_two_ranks_starting_together_tokenize_once(tmp_path, tiny_dir):
    import json

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
            for i in range(3000)]  # fmt: skip
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    home = str(tmp_path / "home")  # cache entries are keyed by content: an empty cache, the tiny model from the session
    ranks = [context.Process(target=build_in_process, args=(str(tmp_path / "d.jsonl"), home, str(tiny_dir), queue))
             for _ in range(2)]  # fmt: skip
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join(timeout=120)
    assert sorted(queue.get(timeout=5) for _ in ranks) == [False, True]  # one built it, the other read it


def test_garbage_is_collected_at_step_boundaries_only(monkeypatch):
    """`--train.gc_every_steps N`: no automatic collection while training (a pause on one rank stalls the others at
    the next collective), the young generations collected every N steps on every rank alike, Python's own collection
    back afterwards, also when training fails; 0 leaves Python's automatic collection alone."""
    from types import SimpleNamespace

    from launch.config import TrainConfig
    from launch.trainer import Trainer

    collected, enabled_while_training = [], []
    monkeypatch.setattr(gc, "collect", lambda generation=2: collected.append(generation))

    def train_step(self) -> dict:
        enabled_while_training.append(gc.isenabled())
        self.step += 1
        if self.step == self.fail_at:
            raise RuntimeError("a failed step")
        return {"step": self.step, "loss": 1.0, "lr": 1e-4, "tokens_per_s": 1.0}

    def run(every: int, total: int, fail_at: int = 0) -> None:
        collected.clear()
        enabled_while_training.clear()
        train = TrainConfig(gc_every_steps=every, eval_every=-1, log_every_s=0)
        stub = SimpleNamespace(train=train, eval_data={}, total_steps=total, step=0, fail_at=fail_at, heartbeat_s=0.0,
                               generation=None, generate_every=0, profiler=None,
                               metrics=SimpleNamespace(log=lambda record: None))  # fmt: skip
        stub.train_step = train_step.__get__(stub)
        Trainer.fit(stub)

    assert gc.isenabled()
    run(every=3, total=7)
    assert collected == [2, 1, 1]  # one full collection first, then the young generations at steps 3 and 6
    assert enabled_while_training == [False] * 7
    assert gc.isenabled()
    with pytest.raises(RuntimeError, match="a failed step"):
        run(every=3, total=7, fail_at=4)
    assert gc.isenabled()
    run(every=0, total=4)
    assert collected == [] and enabled_while_training == [True] * 4
