"""Generation evals in the run (greedy, sharded, every rank in lockstep), the best checkpoint kept beside keep_last,
and the profiler switch."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from conftest import FP32, TINY, load_final, ok, read_metrics, run_cli

from launch.generation import split_at_last_answer

IGNORE = -100


def test_a_prompt_is_everything_before_the_last_answer_and_the_reference_that_answer():
    example = {"input_ids": [1, 10, 11, 12, 2, 20, 21, 22, 2], "labels": [IGNORE, IGNORE, IGNORE, 12, 2, IGNORE,
                                                                             IGNORE, 22, 2]}  # fmt: skip
    assert split_at_last_answer(example, {2}) == ([1, 10, 11, 12, 2, 20, 21], [22])
    assert split_at_last_answer(example, set()) == ([1, 10, 11, 12, 2, 20, 21], [22, 2])
    assert split_at_last_answer({"input_ids": [1, 2], "labels": [IGNORE, IGNORE]}, {2}) is None


def test_best_checkpoint_survives_keep_last_and_ties_go_to_the_later_one(tmp_path):
    import torch.distributed.checkpoint as dcp

    from fsdp.checkpoint import META_FILE, CheckpointManager, SavePolicy, best_checkpoint, checkpoint_name

    root = tmp_path / "checkpoints"
    for step, exact in ((10, 0.2), (20, 0.6), (30, 0.4), (40, 0.6), (50, None)):
        path = root / checkpoint_name(step)
        path.mkdir(parents=True)
        scores = {} if exact is None else {"gen_exact_match": exact, "eval_loss": 1.0 / step}
        dcp.save({"x": torch.zeros(1)}, checkpoint_id=str(path), no_dist=True)  # a readable .metadata
        (path / META_FILE).write_text(json.dumps({"step": step, "scores": scores}))
    assert best_checkpoint(root, "gen_exact_match", lowest=False).name == checkpoint_name(40)
    assert best_checkpoint(root, "eval_loss", lowest=True).name == checkpoint_name(40)
    manager = CheckpointManager(root, SavePolicy(keep_last=1, keep_best_by="gen_exact_match", best_is_lowest=False),
                                {}, torch.device("cpu"))  # fmt: skip
    manager.prune()
    assert sorted(p.name for p in root.iterdir()) == [checkpoint_name(40), checkpoint_name(50)]


def test_generation_samples_reach_wandb_as_a_table(monkeypatch):
    from launch.metrics import wandb_record

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Table=Table))
    record = {"step": 20, "gen_exact_match": 0.5, "gen_samples": [{"source": "", "prompt": "p", "reference": "r",
                                                                   "generated": "g"}]}  # fmt: skip
    table = wandb_record(record)["gen_samples"]
    assert table.columns == ["step", "source", "prompt", "reference", "generated"]
    assert table.data == [[20, "", "p", "r", "g"]]
    assert wandb_record({"step": 1, "loss": 2.0}) == {"step": 1, "loss": 2.0}


STEPS = 80
# fp32, 2 processes, the recipe's batch of 32 and lr; 15 prompts: the ranks decode 8 and 7, and finish at
# different tokens
RUN = [*TINY, *FP32, "--train.max_steps", str(STEPS), "--checkpoint.every_steps", "20"]
EVALS = ["--eval.generate_every", "20", "--eval.generate_count", "15", "--eval.max_new_tokens", "8",
         "--checkpoint.keep_best_by", "gen_exact_match", "--checkpoint.keep_last", "1",
         "--run.profile_steps", "3:5"]  # fmt: skip


@pytest.mark.slow
def test_generation_evals_rise_under_fsdp_and_leave_the_final_weights_bitwise_unchanged(tmp_path):
    with_evals, without = tmp_path / "evals", tmp_path / "plain"
    result = ok(run_cli([*RUN, *EVALS, "--run.output_dir", str(with_evals)], nproc=2))
    ok(run_cli([*RUN, "--run.output_dir", str(without)], nproc=2))
    expected, got = load_final(without), load_final(with_evals)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    steps, evals = read_metrics(with_evals)
    assert [r["loss"] for r in steps] == [r["loss"] for r in read_metrics(without)[0]]
    scored = [r for r in evals if "gen_exact_match" in r]
    assert [r["step"] for r in scored] == [0, 20, 40, 60, 80]
    exact = [r["gen_exact_match"] for r in scored]
    # from 0 (a random model) to 2 of 15 or more by step 80 (300 steps, make smoke's, reach about 70 %)
    assert exact[0] == 0 and exact[-1] >= 2 / 15, exact
    assert all(0 < r["gen_length"] <= 8 and r["gen_contains"] >= r["gen_exact_match"] for r in scored)
    assert all(len(r["gen_samples"]) == 4 and set(r["gen_samples"][0]) == {"source", "prompt", "reference",
                                                                            "generated"} for r in scored)  # fmt: skip
    assert "generation: exact match" in result.stderr
    # the best checkpoint by exact match is kept beside keep_last 1, named by the summary, and exports with --best
    summary = json.loads((with_evals / "summary.json").read_text())
    best = summary["best_checkpoint"]
    assert best["by"] == "gen_exact_match" and best["value"] == max(exact)
    kept = sorted(p.name for p in (with_evals / "checkpoints").glob("step-*"))
    assert kept[-1] == f"step-{STEPS:06d}" and best["path"].endswith(tuple(kept)) and len(kept) <= 2
    assert summary["final_gen_exact_match"] == exact[-1]
    from launch.export import main as export_main

    assert export_main([str(with_evals), str(tmp_path / "best"), "--best"]) == 0
    # the profiler: a Chrome trace per rank of steps 3-5
    for rank in (0, 1):
        trace = json.loads((with_evals / "profile" / f"trace-rank{rank}.json").read_text())
        assert len(trace["traceEvents"]) > 100
        steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")}
        assert steps == {"ProfilerStep#3", "ProfilerStep#4", "ProfilerStep#5"}
