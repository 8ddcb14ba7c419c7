"""Checkpoints across processes: world-size changes resume the same batches, SIGTERM on one process resumes on two,
partial saves are never picked, async saves change nothing, exports round-trip, the rank-0 broadcast load equals plain
transformers, and foreign checkpoints are refused by name. (A SIGKILLed run resuming bit-exactly: test_faults.py.)"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import (
    REFERENCE,
    REFERENCE_STEPS,
    interrupt_with_sigterm,
    load_final,
    metrics_steps,
    ok,
    read_metrics,
    run_cli,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.slow
LAST = REFERENCE_STEPS
ALL_STEPS = list(range(1, LAST + 1))


def assert_final_close(reference_run, out) -> None:
    # Adam steps after a world-size change: gradients summed in another order differ in the last bits, and Adam's
    # 1/sqrt(v) amplifies that where v is tiny (seen: 3 of 122880 elements off by 3e-5).
    expected, got = load_final(reference_run), load_final(out)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-4)


@pytest.mark.parametrize("nproc", [1, 4])
def test_resume_with_another_world_size_continues_the_same_batches(reference_run, tmp_path, nproc):
    checkpoint = reference_run / "checkpoints" / f"step-{LAST - 4:06d}"
    out = tmp_path / "run"
    result = ok(run_cli([*REFERENCE, "--run.resume", str(checkpoint), "--run.output_dir", str(out)], nproc=nproc))
    assert "saved by 2 ranks" in result.stderr
    reference = {r["step"]: r for r in read_metrics(reference_run)[0]}
    resumed = read_metrics(out)[0]
    assert [r["step"] for r in resumed] == ALL_STEPS[-4:]
    for record in resumed:
        assert record["tokens"] == reference[record["step"]]["tokens"]  # the same global batches
        assert record["loss"] == pytest.approx(reference[record["step"]]["loss"], abs=1e-5)
    assert_final_close(reference_run, out)


def test_sigterm_on_one_process_checkpoints_exits_75_and_resumes_on_two(reference_run, tmp_path):
    out = tmp_path / "run"
    args = [*REFERENCE, "--run.output_dir", str(out)]
    log = tmp_path / "one-process.log"
    assert interrupt_with_sigterm(args, out, 6, log) == 75, log.read_text()[-3000:]  # EXIT_PREEMPTED
    marker = json.loads((out / "preempted").read_text())
    assert marker["signal"] == "SIGTERM" and 6 <= marker["step"] < LAST and not (out / "final").exists()
    assert (out / "checkpoints" / f"step-{marker['step']:06d}" / "shardtune.json").is_file()
    result = ok(run_cli(args, nproc=2))
    assert "saved by 1 ranks" in result.stderr and not (out / "preempted").exists()
    assert metrics_steps(out) == ALL_STEPS
    reference = {r["step"]: r for r in read_metrics(reference_run)[0]}
    for record in read_metrics(out)[0]:
        assert record["tokens"] == reference[record["step"]]["tokens"]  # the same global batches throughout
        assert record["loss"] == pytest.approx(reference[record["step"]]["loss"], abs=1e-5)
    assert_final_close(reference_run, out)


def test_partial_or_unreadable_checkpoints_are_never_picked(reference_run, tmp_path):
    from fsdp.checkpoint import CheckpointManager, SavePolicy

    root = tmp_path / "checkpoints"
    shutil.copytree(reference_run / "checkpoints", root)
    # A save killed part-way (temporary name), a step directory without metadata, one with a corrupt marker.
    (root / ".step-000052.tmp").mkdir()
    (root / ".step-000052.tmp" / "__0_0.distcp").write_bytes(b"partial")
    (root / "step-000056").mkdir()
    shutil.copytree(root / f"step-{LAST:06d}", root / "step-000060")
    (root / "step-000060" / "shardtune.json").write_text("{not json")
    manager = CheckpointManager(root, SavePolicy(), {"backbone": "llama2-tiny-chat", "stage": "full"},
                                torch.device("cpu"))  # fmt: skip
    assert manager.select("auto") == root / f"step-{LAST:06d}"


def test_checkpoint_export_round_trips_to_the_trained_weights(reference_run, tmp_path, capsys):
    from launch.export import main as export_main

    out = tmp_path / "export"
    source = reference_run / "checkpoints" / f"step-{LAST:06d}"
    assert export_main([str(source), str(out), "--dtype", "fp32", "--max-shard-size-mb", "1"]) == 0
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    exported = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    final = load_final(reference_run)
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)
    model = AutoModelForCausalLM.from_pretrained(out)
    reference = AutoModelForCausalLM.from_pretrained(reference_run / "final")
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_export_refuses_an_incomplete_checkpoint(tmp_path, capsys):
    from launch.export import main as export_main

    (tmp_path / "step-000004").mkdir()
    assert export_main([str(tmp_path / "step-000004"), str(tmp_path / "o")]) == 2
    assert "incomplete or unreadable" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_rank0_streamed_broadcast_load_equals_plain_transformers():
    result = ok(run_cli([], nproc=2, script="broadcast_load.py"))
    assert "BROADCAST_LOAD_OK" in result.stdout


@pytest.mark.parametrize("flag", [["--model.backbone", "llama2-tiny-pure"], ["--train.stage", "last-layer"]])
def test_resuming_another_backbones_or_stages_checkpoint_is_refused(reference_run, tmp_path, flag):
    from fsdp import DistEnv
    from launch.train import BAD_INPUT, prepare

    checkpoint = reference_run / "checkpoints" / f"step-{LAST:06d}"
    env = DistEnv(0, 1, 0, 1, torch.device("cpu"), "gloo")
    with pytest.raises(BAD_INPUT) as error:
        prepare([*REFERENCE, *flag, "--run.resume", str(checkpoint), "--run.output_dir", str(tmp_path / "run")], env)
    if flag[0] == "--model.backbone":
        assert "backbone 'llama2-tiny-chat' (checkpoint) vs 'llama2-tiny-pure' (--model.backbone)" in str(error.value)
    else:
        assert "stage 'full' (checkpoint) vs 'last-layer' (--train.stage)" in str(error.value)
    assert not (tmp_path / "run").exists()


def test_async_checkpoints_are_complete_and_change_nothing_else(reference_run, tmp_path):
    out = tmp_path / "run"
    ok(run_cli([*REFERENCE, "--checkpoint.async_save", "true", "--run.output_dir", str(out)], nproc=2))
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["latest", f"step-{LAST - 4:06d}", f"step-{LAST:06d}"]  # keep_last=2, no temporary leftovers
    meta = json.loads((out / "checkpoints" / f"step-{LAST:06d}" / "shardtune.json").read_text())
    assert meta["step"] == LAST and meta["world_size"] == 2 and meta["backbone"] == "llama2-tiny-chat"
    expected, got = load_final(reference_run), load_final(out)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
