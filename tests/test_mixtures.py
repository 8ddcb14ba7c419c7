"""Weighted mixtures (data.sources): three sources weighted 0.6 / 0.3 / 0.1 plus a small one seen twice per epoch,
each with its own eval data. The global order is a pure function of (seed, epoch): the same batches on any world size,
token shares within 2 % of the plan over 200 steps, identical training on 1 and 2 processes, and a bitwise resume
after SIGKILL."""

from __future__ import annotations

import json
import random
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import FP32_SMALL, ROOT, ForkedRun, load_final, metrics_steps, ok, read_metrics, run_cli

from launch.config import parse_config
from launch.data import GlobalBatchSampler, Mixture, build_data
from launch.trainer import source_tokens

WEIGHTS = {"general": 0.6, "domain": 0.3, "rare": 0.1}
SIZES = {"general": 600, "domain": 300, "rare": 200, "gold": 40}


def conversations(path: Path, n: int, word: str, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            question = f"{word} question {i} " + " ".join(rng.choice(["alpha", "beta", "gamma"]) for _ in
                                                          range(rng.randint(1, 12)))  # fmt: skip
            answer = f"{word} answer " + " ".join(rng.choice(["one", "two", "three"]) for _ in range(rng.randint(1, 8)))
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": messages}) + "\n")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    """The tiny recipe with a mixture of four sources (general and gold with eval files)."""
    root = tmp_path_factory.mktemp("mixture")
    for seed, (name, n) in enumerate(SIZES.items()):
        conversations(root / f"{name}.jsonl", n, name, seed)
    for name in ("general", "gold"):
        conversations(root / f"{name}-eval.jsonl", 8, name, 100)
    sources = [{"path": str(root / f"{name}.jsonl"), "weight": weight} for name, weight in WEIGHTS.items()]
    sources.append({"path": str(root / "gold.jsonl"), "epochs": 2})
    for source in sources:
        if Path(source["path"]).stem in ("general", "gold"):
            source["eval_path"] = source["path"].replace(".jsonl", "-eval.jsonl")
    base = yaml.safe_load((ROOT / "recipes" / "tiny-full.yaml").read_text())
    base["data"] = {**base.get("data", {}), "sources": sources, "max_length": 64}
    base["data"].pop("path", None)
    (root / "mixture.yaml").write_text(yaml.safe_dump(base))
    return root / "mixture.yaml"


@pytest.fixture(scope="module")
def mixture(recipe) -> tuple[Mixture, dict]:
    from backbones import build_backbone

    config = parse_config(["--config", str(recipe)])
    backbone = build_backbone(config.model.backbone, load_weights=False)
    train, evals = build_data(config.data, backbone, seed=7)
    return train.dataset, evals


def test_a_mixture_keeps_its_token_shares_in_every_window_over_200_steps(mixture):
    data, evals = mixture
    assert data.names == ["general", "domain", "rare", "gold"] and set(evals) == {"general", "gold"}
    shares = dict(zip(data.names, data.target_shares))
    # the weighted sources share what the epoch-counted one leaves, by weight
    for name, weight in WEIGHTS.items():
        assert shares[name] / (1 - shares["gold"]) == pytest.approx(weight, abs=1e-2)
    sampler = GlobalBatchSampler(data.items_per_epoch, 8, 7, epoch_order=data.order)
    assert sampler.steps_per_epoch < 200  # the 200 steps cross an epoch boundary
    got = np.zeros(len(data.names))
    for step in range(200):
        counts = source_tokens(data, sampler.global_batch(step))
        got += counts[len(data.names) :]  # input tokens per source
        if step + 1 in (50, 100, 200):  # any window, not only the whole run
            for name, share, realised in zip(data.names, data.target_shares, got / got.sum()):
                assert abs(realised - share) < 0.02, (step + 1, name, realised, share)
    # the epoch-counted source: every example exactly twice per epoch
    gold = data.starts[3]
    seen = Counter(int(i) - gold for i in data.order(0) if i >= gold)
    assert set(seen.values()) == {2} and len(seen) == SIZES["gold"]


def test_a_mixtures_order_is_the_same_for_any_world_size_and_rebuilt_alike(mixture):
    data, _ = mixture
    sampler = GlobalBatchSampler(data.items_per_epoch, 8, 7, epoch_order=data.order)
    for step in (0, 1, sampler.steps_per_epoch + 3):
        expected = sampler.global_batch(step)
        for world in (1, 2, 4):
            ranks = [sampler.micro_batches(step, rank, world, 2) for rank in range(world)]
            assert [i for micros in ranks for micro in micros for i in micro] == expected
    again = Mixture(data.sources, 7)  # what a resumed process builds
    assert all(np.array_equal(again.order(epoch), data.order(epoch)) for epoch in (0, 1))
    assert not np.array_equal(data.order(0), data.order(1))  # each epoch its own order
    assert not np.array_equal(Mixture(data.sources, 8).order(0), data.order(0))  # and each seed


# FP32_SMALL without its recipe: the mixture's recipe is the tiny one with data.sources
MIXED = [*FP32_SMALL[2:], "--train.max_steps", "12", "--checkpoint.every_steps", "4", "--train.eval_every", "6"]


@pytest.mark.slow
def test_a_mixture_trains_alike_on_one_and_two_processes_and_resumes_bitwise_after_sigkill(recipe, tmp_path):
    def args(name: str) -> list[str]:
        return ["--config", str(recipe), *MIXED, "--run.output_dir", str(tmp_path / name)]

    one = tmp_path / "one"
    ok(run_cli(args("one"), nproc=0))
    two = tmp_path / "two"
    ok(run_cli(args("two"), nproc=2))
    (steps1, evals1), (steps2, evals2) = read_metrics(one), read_metrics(two)
    assert [r["loss"] for r in steps1] == pytest.approx([r["loss"] for r in steps2], abs=1e-5)
    per_source = [k for k in steps1[0] if "/" in k]
    assert sorted(per_source) == sorted(f"{kind}/{name}" for kind in ("tokens", "input_tokens") for name in SIZES)
    assert [[r[k] for k in per_source] for r in steps1] == [[r[k] for k in per_source] for r in steps2]
    assert all(r["tokens"] == sum(r[f"tokens/{n}"] for n in SIZES) for r in steps1)
    assert [set(r) >= {"eval_loss", "eval_loss/general", "eval_loss/gold"} for r in evals1] == [True] * 3
    assert [r["eval_loss/gold"] for r in evals1] == pytest.approx([r["eval_loss/gold"] for r in evals2], abs=1e-5)
    summary = json.loads((one / "summary.json").read_text())["sources"]
    assert list(summary) == list(SIZES) and summary["gold"]["epochs"] == 2 and summary["general"]["weight"] == 0.6
    assert sum(s["input_tokens"] for s in summary.values()) == sum(r["input_tokens"] for r in steps1)
    # SIGKILL every rank after a checkpoint, then the same command: bitwise the uninterrupted 2-process run
    killed = tmp_path / "killed"
    run = ForkedRun(args("killed"), nproc=2, log=tmp_path / "killed.log")
    deadline = time.time() + 180
    while time.time() < deadline and not ((killed / "checkpoints" / "latest").exists() and
                                          max(metrics_steps(killed) or [0]) >= 6):  # fmt: skip
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=60)
    assert 6 <= max(metrics_steps(killed)) < 12 and not (killed / "final").exists()
    ok(run_cli(args("killed"), nproc=2))
    assert metrics_steps(killed) == list(range(1, 13))
    expected, got = load_final(two), load_final(killed)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert [r["loss"] for r in read_metrics(killed)[0]] == [r["loss"] for r in steps2]


STAGES = ["sources", "conversation", "prompting", "tokenize", "cache", "packing", "mixture", "sampler", "batches"]


def stage_of(frame) -> int | None:
    """The pipeline stage a frame's code belongs to (launch/data/__init__.py orchestrates and workers.py runs
    processes: neither is a stage; a prompt builder's methods are stage 3 wherever its family defines it)."""
    from backbones.prompting import Chunk, Prompt, PromptBuilder

    module = frame.f_globals.get("__name__", "")
    if module.startswith("launch.data."):
        name = module.rsplit(".", 1)[1]
        return STAGES.index(name) if name in STAGES else None
    if module == "backbones.prompting" or (module.startswith("backbones.") and isinstance(
            frame.f_locals.get("self"), (PromptBuilder, Prompt, Chunk))):  # fmt: skip
        return STAGES.index("prompting")
    return None


def test_the_walk_from_a_recipe_to_a_batch_enters_each_data_module_once_in_order(recipe, tmp_path, monkeypatch):
    """Two sources (one part and one batch of rows each, a cold cache): every source goes sources -> conversation ->
    prompting -> tokenize -> cache -> packing, then the mixture, the sampler and the micro-batch, each stage entered
    once. A later stage may read from an earlier one (the mixture reads its sources' items); no stage ever calls a
    later one, nor the orchestrator."""
    import sys

    from backbones import build_backbone
    from launch.data import micro_batch

    small = [{"path": str(recipe.parent / "general-eval.jsonl"), "weight": 1.0},
             {"path": str(recipe.parent / "gold-eval.jsonl"), "epochs": 1}]  # 8 rows each  # fmt: skip
    config = parse_config(["--config", str(recipe), "--data.sources", json.dumps(small)])
    backbone = build_backbone(config.model.backbone, load_weights=False)
    monkeypatch.setenv("SHARDTUNE_HOME", str(tmp_path))  # a cold tokenization cache (the model is built)
    entered, backwards, callbacks, trail = [], [], [], []

    def profile(frame, event, _arg):
        if event != "call" or (stage := stage_of(frame)) is None:
            return
        callers = []  # (stage or "orchestrator"), innermost first
        caller = frame.f_back
        while caller is not None:
            if (s := stage_of(caller)) is not None:
                callers.append(s)
            elif caller.f_globals.get("__name__") == "launch.data":
                callers.append("orchestrator")
            caller = caller.f_back
        stages = [s for s in callers if s != "orchestrator"]
        if stages and max(stages) > stage:  # inside a later stage's call: it reads an earlier stage's output
            backwards.append((STAGES[max(stages)], STAGES[stage]))
            return
        nearest = callers[0] if callers else None
        if (nearest != "orchestrator" and nearest is not None and nearest < stage) or (
                nearest == "orchestrator" and stages):  # fmt: skip
            callbacks.append((frame.f_code.co_qualname, [STAGES[s] if s != "orchestrator" else s for s in callers]))
        if not entered or entered[-1] != STAGES[stage]:
            entered.append(STAGES[stage])
            trail.append(f"{STAGES[stage]}: {frame.f_code.co_name} <- {frame.f_back.f_code.co_qualname}")

    sys.setprofile(profile)
    try:
        train, _ = build_data(config.data, backbone, seed=7, with_eval=False)
        sampler = GlobalBatchSampler(train.dataset.items_per_epoch, 8, 7, epoch_order=train.dataset.order)
        micro_batch(train.dataset, sampler.micro_batches(0, 0, 1, 8)[0], 0, "padded")
    finally:
        sys.setprofile(None)
    per_source = STAGES[:6]
    assert entered == [*per_source, *per_source, "mixture", "sampler", "batches"], "\n".join(trail)
    assert not callbacks, callbacks
    assert ("mixture", "cache") in backwards and ("sampler", "mixture") in backwards  # reads, in the one direction
