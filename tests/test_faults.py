"""Bad input and faults, table-driven. Every refusal exits with status 2 and one line naming the value, the choices
and the flag, and leaves every file that existed before it byte-identical. Every fault (a killed launcher, a second
launch, Ctrl-C, a damaged checkpoint, a full disk, a frozen rank, a planted pickle) ends cleanly and resumably."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    FP32_SMALL,
    REFERENCE,
    REFERENCE_STEPS,
    ROOT,
    TINY,
    ForkedRun,
    descendants,
    launch_command,
    launch_env,
    load_final,
    metrics_steps,
    ok,
    run_cli,
)

# ---------------------------------------------------------------- refusals, in-process: `launch.train.main(argv)`


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def chat_file(tmp: Path, rows: int, name: str = "d.jsonl") -> str:
    line = json.dumps({"messages": [{"role": "user", "content": "What is 1 plus 1?"},
                                    {"role": "assistant", "content": "2"}]})  # fmt: skip
    (tmp / name).write_text((line + "\n") * rows)
    return str(tmp / name)


def finished_run(tmp: Path) -> Path:
    out = tmp / "run"
    (out / "final").mkdir(parents=True)
    (out / "final" / "model.safetensors").write_bytes(b"weights")
    (out / "checkpoints" / "step-000004").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    return out


def truncated_model(tmp: Path, tiny_dir: Path) -> str:
    model = tmp / "model"
    shutil.copytree(tiny_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return str(model)


def non_utf8(tmp: Path) -> str:
    good = Path(chat_file(tmp, 1)).read_bytes()
    (tmp / "d.jsonl").write_bytes(good + b'{"messages": "caf\xe9"}\n')
    return str(tmp / "d.jsonl")


MOUNTS: list[Path] = []  # unmounted after each test


def read_only_dir(tmp: Path) -> str:
    ro = tmp / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1M", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("needs root to mount a read-only filesystem (root ignores permission bits)")
    MOUNTS.append(ro)
    return str(ro / "run")


def out(tmp: Path) -> list[str]:
    return ["--run.output_dir", str(tmp / "run")]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def config_only_model(tmp: Path) -> str:
    return str(write(tmp / "m" / "config.json", "{}").parent)


def unfinished_run(tmp: Path) -> Path:
    (tmp / "run" / "checkpoints" / "step-000002").mkdir(parents=True)
    return tmp


def conversations(tmp: Path, rows: list, name: str = "d.jsonl") -> str:
    (tmp / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(tmp / name)


def empty_answers(tmp: Path) -> str:
    empty = {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]}
    return conversations(tmp, [empty] * 40)


def corrupt_parquet(tmp: Path) -> str:
    (tmp / "d.parquet").write_bytes(b"PAR1" + os.urandom(200) + b"PAR1")
    return str(tmp / "d.parquet")


def long_question(tmp: Path) -> str:
    row = {"messages": [{"role": "user", "content": "why " * 200}, {"role": "assistant", "content": "because"}]}
    return conversations(tmp, [row] * 40)


# case -> (argv from the case's tmp directory and the tiny model's directory, what the one line must say)
REFUSALS = {
    "lr_zero": (lambda t, m: [*out(t), "--train.lr", "0"], "--train.lr=0.0 must be a positive number"),
    "lr_nan": (lambda t, m: [*out(t), "--train.lr", "nan"], "--train.lr=nan must be a positive number"),
    "lr_not_a_number": (lambda t, m: [*out(t), "--train.lr", "abc"], "--train.lr=abc is not valid: expected a number"),
    "betas_one_value": (lambda t, m: [*out(t), "--train.betas", "[0.9]"], "--train.betas=[0.9] must be two numbers"),
    "typo_on_the_cli": (
        lambda t, m: [*out(t), "--train.lrr", "1e-3"],
        "unknown key train.lrr (did you mean train.lr?)",
    ),
    "hf_trainer_name": (
        lambda t, m: [*out(t), "--train.learning_rate", "1e-3"],
        "unknown key train.learning_rate (did you mean train.lr?)",
    ),
    "typo_in_a_recipe": (
        lambda t, m: ["--config", str(write(t / "r.yaml", "train:\n  lrr: 0.1\n")), *out(t)],
        "unknown key train.lrr in",
    ),
    "output_dir_is_a_file": (lambda t, m: ["--run.output_dir", str(write(t / "file", "x"))], "is a file"),
    "output_dir_empty": (lambda t, m: ["--run.output_dir", ""], "--run.output_dir is empty"),
    "output_dir_read_only": (lambda t, m: ["--run.output_dir", read_only_dir(t)], "is not writable"),
    "non_utf8_data": (lambda t, m: [*out(t), "--data.path", non_utf8(t)], "d.jsonl:2: not valid UTF-8 (byte 0xe9"),
    "dataset_smaller_than_a_batch": (
        lambda t, m: [*out(t), "--data.path", chat_file(t, 3), "--data.packing", "true"],
        "1 packed rows of 128 tokens cannot fill one global batch of 32",
    ),
    "model_path_empty": (lambda t, m: [*out(t), "--model.path", ""], "--model.path is empty"),
    "model_path_missing": (lambda t, m: [*out(t), "--model.path", str(t / "nope")], "no such directory"),
    "model_path_without_weights": (
        lambda t, m: [*out(t), "--model.path", config_only_model(t)],
        "lacks a tokenizer (tokenizer.json or tokenizer.model), weights (*.safetensors)",
    ),
    "truncated_safetensors": (
        lambda t, m: [*out(t), "--model.path", truncated_model(t, m)],
        "model.safetensors: truncated",
    ),
    "finished_run_without_overwrite": (lambda t, m: [*out(finished_run(t).parent)], "holds a finished run"),
    "overwrite_with_a_bad_value_keeps_the_finished_run": (
        lambda t, m: [*out(finished_run(t).parent), "--run.overwrite", "true", "--train.lr", "-1"],
        "--train.lr=-1.0 must be a positive number",
    ),
    "lora_flag_with_the_full_stage": (
        lambda t, m: [*out(t), "--lora.rank", "32"],
        "--lora.rank=32 applies to --train.stage lora only, and the stage is full",
    ),
    "shard_size_zero": (
        lambda t, m: [*out(t), "--export.max_shard_size_mb", "0"],
        "--export.max_shard_size_mb=0 would write one file per tensor; use >= 1",
    ),
    "every_answer_empty": (
        lambda t, m: [*out(t), "--data.path", empty_answers(t)],
        "d.jsonl: every assistant answer is empty (40 answers in 40 rows)",
    ),
    "messages_not_a_list": (
        lambda t, m: [*out(t), "--data.path", conversations(t, [{"messages": "hello"}])],
        "d.jsonl:1: field 'messages' must be a list of {role, content} messages, found str",
    ),
    "corrupt_parquet": (
        lambda t, m: [*out(t), "--data.path", corrupt_parquet(t)],
        "d.parquet: not a readable parquet file",
    ),
    "empty_recipe": (lambda t, m: ["--config", str(write(t / "r.yaml", "# nothing yet\n")), *out(t)], "is empty"),
    "max_length_cuts_every_answer": (
        lambda t, m: [*out(t), "--data.path", long_question(t), "--data.packing", "true", "--data.max_length", "64"],
        "--data.max_length=64",
    ),
    "source_with_a_weight_and_epochs": (
        lambda t, m: [*out(t), "--data.sources", f"[{{path: {chat_file(t, 40)}, weight: 1, epochs: 2}}]"],
        "d.jsonl): give either weight (a share of the mixture's tokens) or epochs (passes per epoch), not both",
    ),
    "typo_in_a_source": (
        lambda t, m: [
            "--config",
            str(write(t / "r.yaml", "data:\n  sources:\n    - {path: a.jsonl, wieght: 1}\n")),
            *out(t),
        ],  # fmt: skip
        "unknown key wieght in source 0 of data.sources in",
    ),
    "sources_and_a_data_path": (
        lambda t, m: [
            *out(t),
            "--data.path",
            chat_file(t, 40),
            "--data.sources",
            f"[{{path: {chat_file(t, 40)}, weight: 1}}]",
        ],  # fmt: skip
        "data.sources and --data.path=",
    ),
    "resume_never_over_checkpoints": (
        lambda t, m: [*out(unfinished_run(t)), "--run.resume", "never"],
        "--run.resume=never: --run.output_dir=",
    ),
}


@pytest.fixture
def in_process(monkeypatch):
    """launch.train.main in this process: its signal handlers and logging are put back afterwards."""
    import logging

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    monkeypatch.setenv("WORLD_SIZE", "1")
    from launch.train import main

    yield main
    while MOUNTS:
        subprocess.run(["umount", "-l", str(MOUNTS.pop())], check=False)
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    root.handlers[:], root.level = saved


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_bad_input_is_refused_in_one_line_and_changes_nothing(case, tmp_path, tiny_dir, in_process, capsys):
    make_argv, message = REFUSALS[case]
    argv = make_argv(tmp_path, tiny_dir)
    argv = argv if "--config" in argv else [*TINY, *argv]
    before = snapshot(tmp_path)
    status = in_process(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("shardtune")]
    assert status == 2, lines
    assert len(lines) == 1 and message in lines[0], lines
    assert snapshot(tmp_path) == before


def test_wandb_without_credentials_falls_back_to_offline_with_a_warning(monkeypatch, tmp_path):
    from launch.metrics import wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    mode, warning = wandb_mode()
    assert mode == "offline" and "WANDB_API_KEY" in warning
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == ("online", None)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == ("disabled", None)


def test_wandb_keeps_the_steps_a_resumed_run_logs_again(monkeypatch, tmp_path):
    """wandb drops records whose `step=` does not increase: shardtune never passes one, and plots against `step`."""
    import types

    from launch.metrics import MetricsWriter

    logged, defined = [], []
    run = types.SimpleNamespace(log=lambda record, **kw: logged.append((record, kw)), finish=lambda: None,
                                define_metric=lambda name, **kw: defined.append((name, kw)),
                                id="x", dir=tmp_path)  # fmt: skip
    wandb = types.SimpleNamespace(init=lambda **kw: run, Settings=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    for steps in ([1, 2, 3, 4], [3, 4]):  # a run, then its resume from the step-2 checkpoint
        writer = MetricsWriter(tmp_path, ["jsonl", "wandb"], {}, True, "p")
        writer.truncate_after(2)
        for step in steps:
            writer.log({"step": step, "loss": 1.0})
        writer.close()
    assert [record["step"] for record, _ in logged] == [1, 2, 3, 4, 3, 4] and all(not kw for _, kw in logged)
    assert ("*", {"step_metric": "step"}) in defined
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


# ---------------------------------------------------------------- the export CLI never destroys


@pytest.fixture(scope="module")
def a_run(tmp_path_factory):
    """A finished 1-process run with one checkpoint (step 2)."""
    run = tmp_path_factory.mktemp("export") / "run"
    ok(run_cli([*FP32_SMALL, "--train.max_steps", "2", "--run.output_dir", str(run)], nproc=0))
    return run


EXPORT_REFUSALS = {
    "into_the_checkpoint": (lambda r, t: r / "checkpoints" / "step-000002", "is the source"),
    "inside_the_checkpoint": (lambda r, t: r / "checkpoints" / "step-000002" / "x", "lies inside the source"),
    "onto_the_run_directory": (lambda r, t: r, "contains the source"),
    "over_the_checkpoints": (lambda r, t: r / "checkpoints", "contains the source"),
    "over_unrelated_files": (
        lambda r, t: write(t / "mine" / "notes.txt", "keep").parent,
        "is not empty and is not an earlier export",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(EXPORT_REFUSALS))
def test_export_refuses_to_clobber_and_changes_nothing(a_run, tmp_path, case, capsys):
    from launch.export import main as export_main

    destination, message = EXPORT_REFUSALS[case]
    target = destination(a_run, tmp_path)
    before = {**snapshot(a_run), **snapshot(tmp_path)}
    status = export_main([str(a_run), str(target)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and message in lines[0], lines
    assert {**snapshot(a_run), **snapshot(tmp_path)} == before


@pytest.mark.slow
def test_export_from_a_run_replaces_an_earlier_export_and_defaults_to_the_runs_dtype(a_run, tmp_path):
    target = tmp_path / "export"
    for _ in range(2):  # the second export replaces the first (it is an earlier export)
        result = run_cli([str(a_run), str(target)], nproc=0, module="launch.export", timeout=120)
        assert result.returncode == 0, result.stderr
    assert "(fp32)" in result.stdout  # FP32_SMALL exports in fp32
    exported = {k: v for k, v in load_final_dir(target).items()}
    final = load_final(a_run)
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)
    assert not list(tmp_path.glob(".export-*"))  # no temporary left


def load_final_dir(directory: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


# ---------------------------------------------------------------- faults during a run (real processes)


def start(args: list[str], log: Path, nproc: int = 2) -> subprocess.Popen:
    """torchrun itself: the test is about its agent."""
    command = launch_command(args, nproc, launcher="torchrun")
    return subprocess.Popen(command, cwd=ROOT, env=launch_env(), stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_for(condition, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not condition():
        time.sleep(0.05)
    assert condition(), "timed out waiting"


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_sigkill_of_the_torchrun_agent_stops_its_workers_and_the_rerun_is_bitwise_equal(reference_run, tmp_path):
    run = tmp_path / "run"
    args = [*REFERENCE, "--run.output_dir", str(run)]
    agent = start(args, tmp_path / "agent.log")
    wait_for(lambda: (run / "checkpoints" / "latest").exists() and max(metrics_steps(run) or [0]) >= 6)
    workers = [pid for pid in descendants(agent.pid) if "launch.train" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert len(workers) == 2
    os.kill(agent.pid, signal.SIGKILL)  # the agent alone: it forwards nothing
    agent.wait()
    killed = time.time()
    wait_for(lambda: not any(alive(pid) for pid in workers), timeout=15)
    assert time.time() - killed < 15
    assert 6 <= max(metrics_steps(run)) < REFERENCE_STEPS and not (run / "final").exists()
    ok(run_cli(args, nproc=2))
    assert metrics_steps(run) == list(range(1, REFERENCE_STEPS + 1))
    expected, got = load_final(reference_run), load_final(run)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.slow
def test_a_second_launch_is_refused_and_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    run = tmp_path / "run"
    args = [*FP32_SMALL, "--train.max_steps", "400", "--run.output_dir", str(run)]
    first = ForkedRun(args, log=tmp_path / "first.log")
    wait_for(lambda: max(metrics_steps(run) or [0]) >= 2)
    second = run_cli(args, nproc=2, timeout=120)
    refusals = [line for line in second.stderr.splitlines() if line.startswith("shardtune:")]
    assert second.returncode != 0 and len(refusals) == 1, second.stderr[-2000:]
    assert f"is in use by another run (host {os.uname().nodename}, PID {first.pids[0]}" in refusals[0]
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=120).returncode == 130
    output = (tmp_path / "first.log").read_text()
    assert "Traceback" not in output and "interrupted (SIGINT): checkpoint at step" in output
    stopped = max(metrics_steps(run))
    assert (run / "checkpoints" / f"step-{stopped:06d}").is_dir() and not (run / "final").exists()
    assert metrics_steps(run) == list(range(1, stopped + 1))  # one run's steps only: nothing interleaved


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_resumes_from_the_previous_and_a_lost_export_only_exports(reference_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference_run / "checkpoints", run / "checkpoints")
    newest = run / "checkpoints" / f"step-{REFERENCE_STEPS:06d}"
    (newest / "__1_0.distcp").write_bytes((newest / "__1_0.distcp").read_bytes()[:100])  # truncated
    previous = run / "checkpoints" / f"step-{REFERENCE_STEPS - 4:06d}"
    shutil.copytree(previous, run / "checkpoints" / ".step-000052.tmp")  # a killed save
    args = [*REFERENCE, "--run.output_dir", str(run)]
    result = ok(run_cli(args, nproc=1))
    warnings = [line for line in result.stderr.splitlines() if "skipping damaged checkpoint" in line]
    assert len(warnings) == 1 and "__1_0.distcp is truncated" in warnings[0]
    assert f"resuming from {previous}" in result.stderr
    assert not (run / "checkpoints" / ".step-000052.tmp").exists()
    expected, got = load_final(reference_run), load_final(run)
    for name in expected:  # 4 Adam steps on 1 process after 44 on 2: equal up to summation order
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-4)
    # A failed export (final/ lost) is finished by the same command: it resumes at the last step and only exports.
    shutil.rmtree(run / "final")
    steps = metrics_steps(run)
    ok(run_cli(args, nproc=1))
    assert metrics_steps(run) == steps and all(torch.equal(got[k], load_final(run)[k]) for k in got)


@pytest.mark.slow
def test_a_resume_past_the_last_step_is_refused_and_changes_nothing(reference_run, tmp_path, in_process, capsys):
    """A step-24 checkpoint under --train.max_steps 5 would train nothing and export its own weights as final/."""
    run = tmp_path / "run"
    shutil.copytree(reference_run / "checkpoints", run / "checkpoints")
    shutil.copy(reference_run / "metrics.jsonl", run / "metrics.jsonl")
    before = snapshot(tmp_path)
    status = in_process([*FP32_SMALL, "--train.max_steps", "5", "--checkpoint.every_steps", "4", *out(tmp_path)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("shardtune")]
    assert status == 2 and len(lines) == 1, lines
    assert f"step-{REFERENCE_STEPS:06d} (step {REFERENCE_STEPS}): it is past the last step of this run (5, " \
           "--train.max_steps=5); raise --train.max_steps" in lines[0]  # fmt: skip
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_a_start_from_step_0_keeps_an_earlier_starts_records_aside(reference_run, tmp_path):
    """--checkpoint.keep_last 1 and that checkpoint damaged: the run starts over, and says so once; the records the
    earlier start wrote are kept under names that say so, and the new ones hold this run's steps only."""
    run = tmp_path / "run"
    newest = run / "checkpoints" / f"step-{REFERENCE_STEPS:06d}"
    shutil.copytree(reference_run / "checkpoints" / newest.name, newest)
    (newest / "__0_0.distcp").write_bytes(b"")  # damaged
    for name in ("metrics.jsonl", "loss.png"):
        shutil.copy(reference_run / name, run / name)
    earlier = (run / "metrics.jsonl").read_bytes()
    result = ok(run_cli([*FP32_SMALL, "--train.max_steps", "4", "--checkpoint.keep_last", "1",
                         "--run.output_dir", str(run)], nproc=0))  # fmt: skip
    warnings = [line.split(" WARNING ", 1)[1] for line in result.stderr.splitlines() if " WARNING " in line]
    skipped = f"fsdp.checkpoint: skipping damaged checkpoint {newest.name}: {newest / '__0_0.distcp'} is truncated"
    assert len(warnings) == 3 and warnings[0].startswith(skipped) and warnings[0].endswith("; trying an older one")
    assert warnings[1:] == [
        f"fsdp.checkpoint: no intact checkpoint left in {run / 'checkpoints'}: this run starts from the pretrained "
        "weights at step 0",
        f"launch.train: {run}: no checkpoint to resume, so this run starts from the pretrained weights at step 0; the "
        "records of an earlier start there are kept as metrics.earlier-1.jsonl, loss.earlier-1.png",
    ], warnings
    assert (run / "metrics.earlier-1.jsonl").read_bytes() == earlier
    assert metrics_steps(run) == [1, 2, 3, 4]
    assert json.loads((run / "summary.json").read_text())["steps"] == 4


@pytest.mark.slow
def test_a_record_cut_short_by_a_kill_is_dropped_with_a_warning_by_resume_and_plot(reference_run, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(reference_run / "checkpoints", run / "checkpoints")
    shutil.rmtree(run / "checkpoints" / f"step-{REFERENCE_STEPS:06d}")  # resume from step 20
    lines = (reference_run / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["step"] <= 22]
    cut = lines[len(kept)][:25]  # the record of step 23, as a kill mid-write leaves it: no closing brace, no newline
    (run / "metrics.jsonl").write_text("\n".join(kept) + "\n" + cut)
    from launch.plot import main as plot_main

    assert plot_main([str(run), "--out", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").stat().st_size > 0
    said = f"metrics.jsonl:{len(kept) + 1}: dropped an unreadable record (cut short: the run was stopped while writing"
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(dropped) == 1 and said in dropped[0], dropped
    result = ok(run_cli([*REFERENCE, "--run.output_dir", str(run)], nproc=2))
    assert result.stderr.count(said) == 1 and "JSONDecodeError" not in result.stderr
    assert metrics_steps(run) == list(range(1, REFERENCE_STEPS + 1))
    expected, got = load_final(reference_run), load_final(run)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.slow
def test_ctrl_c_during_start_up_says_one_line_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    process = subprocess.Popen(launch_command([*TINY, "--run.output_dir", str(run)], 0), cwd=ROOT, env=launch_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    # torch's libraries mapped: the import of torch (then transformers) is under way, seconds before main() starts
    wait_for(lambda: "libtorch" in Path(f"/proc/{process.pid}/maps").read_text(), timeout=60)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines() == ["shardtune: interrupted during start-up; nothing was written"]
    assert not run.exists()


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20M", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_says_so_keeps_the_earlier_checkpoint_and_the_run_resumes(small_disk, tmp_path):
    run = small_disk / "run"  # a checkpoint of the tiny model is ~12 MB: one fits, two do not
    args = [*FP32_SMALL, "--train.max_steps", "6", "--checkpoint.every_steps", "2", "--checkpoint.keep_last", "1",
            "--run.output_dir", str(run)]  # fmt: skip
    result = run_cli(args, nproc=0)
    lines = [line for line in result.stderr.splitlines() if line.startswith("shardtune:")]
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-3000:]
    assert (
        "no space for checkpoint" in lines[0] and "MiB free" in lines[0] and "earlier checkpoints are kept" in lines[0]
    )
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(("step-", ".step-"))] == [
        "step-000002"
    ]
    subprocess.run(["mount", "-o", "remount,size=64M", str(small_disk)], check=True)
    result = ok(run_cli(args, nproc=0))
    assert "resuming from" in result.stderr and metrics_steps(run) == list(range(1, 7))
    assert (run / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_frozen_rank_is_named_by_the_heartbeat_and_ends_the_job_within_the_collective_timeout(tmp_path):
    """Two ranks with no agent (torchrun would add its own 30 s SIGTERM-to-SIGKILL grace before it reaps the frozen
    rank); rank 1 is frozen with SIGSTOP: after --run.heartbeat_s rank 0 logs the step and the silent rank, and it
    ends within the configured timeout, saying so."""
    run = tmp_path / "run"
    args = [*FP32_SMALL, "--train.max_steps", "400", "--run.collective_timeout_s", "8", "--run.heartbeat_s", "1",
            "--run.output_dir", str(run)]  # fmt: skip
    job = ForkedRun(args, 2, log=tmp_path / "ranks.log")
    rank0 = job.processes[0]
    try:
        wait_for(lambda: max(metrics_steps(run) or [0]) >= 3)
        os.kill(job.pids[1], signal.SIGSTOP)  # rank 1 stops responding
        frozen = time.time()
        rank0.join(timeout=60)
        status, ended = rank0.exitcode, time.time() - frozen
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=60)
    lines = (tmp_path / "ranks.log").read_text().splitlines()
    line = next(x for x in lines if "stopped responding" in x)
    assert status == 1 and ended < 8 + 10, (status, ended)
    assert line.startswith("shardtune: rank 0: step ") and "--run.collective_timeout_s=8" in line
    # the heartbeat named the silent rank and the step long before the timeout
    heartbeat = next(x for x in lines if "heartbeat: step " in x)
    assert "no word from rank 1 (" in heartbeat and lines.index(heartbeat) < lines.index(line), heartbeat


# ---------------------------------------------------------------- checkpoints load plain data only; permissions


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_in_a_state_file_is_refused_and_nothing_runs(process_group, tmp_path):
    from backbones import build_backbone
    from fsdp import apply_parallelism, build_mesh
    from fsdp.checkpoint import CheckpointError, CheckpointManager, SavePolicy
    from fsdp.materialize import materialize

    backbone = build_backbone("llama2-tiny-chat", load_weights=False)
    model = apply_parallelism(backbone.llm, backbone.transformer_layer_cls, build_mesh(process_group, "full"),
                              param_dtype=None)  # fmt: skip
    materialize(model, process_group.device)
    optimizer = torch.optim.AdamW(model.parameters())
    manager = CheckpointManager(tmp_path / "ckpt", SavePolicy(), {"world_size": 1}, process_group.device)
    manager.load(model, optimizer, None, backbone.pretrained_weights)
    manager.save(1, model, optimizer, {"step": 1}, force=True)
    state_file = tmp_path / "ckpt" / "step-000001" / "rank-00000.pt"
    marker = tmp_path / "code-ran"
    torch.save({"trainer": Payload(marker), "rng": {}}, state_file)
    with pytest.raises(CheckpointError, match="rank-00000.pt holds more than tensors and plain values"):
        manager.load(model, optimizer, tmp_path / "ckpt" / "step-000001", backbone.pretrained_weights)
    assert not marker.exists()


@pytest.mark.parametrize("umask, dirs, files", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_exports_are_readable_as_the_umask_allows(tmp_path, umask, dirs, files):
    from fsdp.export import export_hf

    sources = [("w", torch.Size([4]), lambda: torch.ones(4))]
    previous = os.umask(umask)
    try:
        export_hf(sources, tmp_path / "final", "fp32", 100, write=True, save_extras=lambda d: None)
    finally:
        os.umask(previous)
    assert (tmp_path / "final").stat().st_mode & 0o777 == dirs
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "final").iterdir()} == {
        "model.safetensors": files,
        "shardtune-export.json": files,
    }


def test_async_saves_publish_at_the_first_step_boundary_after_their_write(process_group, tmp_path):
    from backbones import build_backbone
    from fsdp import apply_parallelism, build_mesh
    from fsdp.checkpoint import CheckpointManager, SavePolicy
    from fsdp.materialize import materialize

    backbone = build_backbone("llama2-tiny-chat", load_weights=False)
    model = apply_parallelism(backbone.llm, backbone.transformer_layer_cls, build_mesh(process_group, "full"),
                              param_dtype=None)  # fmt: skip
    materialize(model, process_group.device)
    optimizer = torch.optim.AdamW(model.parameters())
    manager = CheckpointManager(tmp_path / "ckpt", SavePolicy(every_steps=5, async_save=True), {"world_size": 1},
                                process_group.device)  # fmt: skip
    manager.load(model, optimizer, None, backbone.pretrained_weights)
    assert manager.save(5, model, optimizer, {"step": 5})
    assert not (tmp_path / "ckpt" / "step-000005").exists()  # written in the background, not yet published
    wait_for(lambda: manager.votes()[1] == 1.0, timeout=60)
    manager.publish_if_written(manager.votes()[1])  # the next step boundary: every rank's write is done
    assert (tmp_path / "ckpt" / "step-000005" / "shardtune.json").is_file()
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step-000005"
