"""Around the run: loss curves and a summary, the run record, progress lines in log files, a chat template in every
export, a --help people can use, accelerate's traps, and an unreachable Hub refused in seconds."""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FP32_SMALL, ROOT, launch_env, ok, read_metrics, run_cli

from backbones.prompting import LLaMa2ChatPromptBuilder, PurePromptBuilder, VicunaV15PromptBuilder

BUILDERS = [PurePromptBuilder, LLaMa2ChatPromptBuilder, VicunaV15PromptBuilder]
TURNS = [("What is 2 plus 3?", "5"), ("And the capital of Peru?", "Lima"), ("Opposite of hot?", "cold")]


@pytest.mark.parametrize("system", [None, "Answer with one word."])
@pytest.mark.parametrize("turns", [1, 2, 3])
@pytest.mark.parametrize("builder", BUILDERS, ids=lambda b: b.__name__)
def test_chat_template_renders_exactly_the_prompt_builders_text(tiny_backbone, builder, turns, system):
    tokenizer = tiny_backbone.tokenizer
    messages = [{"role": "system", "content": system}] if system else []
    for user, answer in TURNS[:turns]:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    prompt = builder("x").build(TURNS[:turns], system=system)
    template = builder.template_for(tokenizer.all_special_tokens)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template)
    assert rendered == prompt.text
    generation = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True,
                                               chat_template=template)  # fmt: skip
    assert generation == prompt.until_answer(turns - 1).text


def write_metrics(run_dir: Path, steps: int, scale: float) -> None:
    run_dir.mkdir(parents=True)
    records = [{"step": s, "loss": scale / s, "lr": 1e-3, "tokens": 100, "input_tokens": 120, "tokens_per_s": 900.0,
                "step_time_s": 0.1, "epoch": s / steps} for s in range(1, steps + 1)]  # fmt: skip
    records += [{"step": s, "eval_loss": scale / (s + 1)} for s in (0, steps // 2, steps)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_plot_overlays_runs_in_four_panels(tmp_path):
    from launch.plot import PANELS, main, plot_runs

    write_metrics(tmp_path / "a", 20, 3.0)
    write_metrics(tmp_path / "b", 30, 2.0)
    figure = plot_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "both.png")
    axes = [a for a in figure.axes if a.get_title()]
    assert [a.get_title() for a in axes] == list(PANELS)
    assert all(len(a.get_legend_handles_labels()[1]) == 2 for a in axes)  # both runs in every panel
    assert (tmp_path / "both.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cli.png")]) == 0
    assert main([str(tmp_path / "nowhere")]) == 2


def test_progress_in_a_log_file_is_one_line_per_cadence(caplog):
    from launch.metrics import Progress

    progress = Progress(total=9, initial=0, enabled=True, every_s=0, every_steps=3, interactive=False)
    with caplog.at_level(logging.INFO, logger="launch.progress"):
        for step in range(1, 10):
            progress.step({"step": step, "loss": 1.0, "lr": 1e-3, "tokens_per_s": 100.0})
    lines = [r.getMessage() for r in caplog.records if r.name == "launch.progress"]
    assert [line.split(" | ")[0] for line in lines] == ["step 3/9", "step 6/9", "step 9/9"]
    assert all("loss 1.0000" in line and "lr 0.001" in line and "tok/s" in line and "ETA" in line for line in lines)


def test_help_is_quick_and_lists_config_every_documented_field_and_the_recipes():
    start = time.time()
    result = subprocess.run([sys.executable, "-m", "launch.train", "--help"], cwd=ROOT, env=launch_env(),
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    elapsed = time.time() - start
    assert result.returncode == 0 and elapsed < 3, elapsed
    text = result.stdout
    assert "--config RECIPE" in text and "recipes/tiny-full.yaml" in text and "recipes/llama2-7b-chat-full.yaml" in text
    assert "--train.lr float" in text and "--fsdp.activation_checkpointing str" in text
    assert "none | full (recompute each decoder block in backward)" in text  # a field's comment is its help
    for section in ("model:", "data:", "train:", "fsdp:", "checkpoint:", "run:", "export:"):
        assert sum(line.startswith(section) for line in text.splitlines()) == 1


def test_accelerate_refuses_one_process_for_several_and_warns_on_its_mixed_precision(monkeypatch, caplog):
    from launch.config import parse_config
    from launch.validate import accelerate_problems

    config = parse_config(["--fsdp.mixed_precision", "fp32"])
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with caplog.at_level(logging.WARNING):
        problems = accelerate_problems(config)
    assert problems and "--multi_gpu" in problems[0]
    assert "accelerate's --mixed_precision=bf16 is not used" in caplog.text
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert accelerate_problems(config) == []


def test_an_unreachable_hub_fails_in_seconds_and_says_what_to_do(monkeypatch, tmp_path):
    import torch

    from backbones import hub
    from fsdp import DistEnv
    from launch.train import BAD_INPUT, prepare

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty Hub cache
    hub.hub_unreachable.cache_clear()
    start = time.time()
    with pytest.raises(BAD_INPUT) as error:
        prepare(["--model.backbone", "llama2-7b-chat", "--run.output_dir", str(tmp_path / "run")],
                DistEnv(0, 1, 0, 1, torch.device("cpu"), "gloo"))  # fmt: skip
    hub.hub_unreachable.cache_clear()
    assert time.time() - start < 10
    assert "cannot reach the Hugging Face Hub" in str(error.value) and "--model.path" in str(error.value)
    assert "HF_HUB_OFFLINE=1" in str(error.value)


@pytest.mark.slow
def test_a_run_writes_curves_summary_record_and_progress_lines_and_no_secret(tmp_path):
    from PIL import Image

    # Both tokens (HF_TOKEN's, and the one --model.hf_token_file holds) also occur inside the output path: every
    # value that holds the path (config.yaml, run.json, _name_or_path in final/, wandb's config) must mask them.
    secret, file_secret = "hf_SECRETtoken1234567890", "hf_FILEtoken0987654321"
    out = tmp_path / f"team-{file_secret}" / f"run-{secret}"
    token_file = tmp_path / "token"
    token_file.write_text(file_secret + "\n")
    wandb = importlib.util.find_spec("wandb") is not None  # the GPU image (make gpu-rehearsal) has no wandb
    args = [*FP32_SMALL, "--train.max_steps", "6", "--train.eval_every", "3", "--train.log_every_s", "0",
            "--train.log_every_steps", "2", "--run.trackers", "[jsonl,wandb]" if wandb else "[jsonl]",
            "--model.hf_token_file", str(token_file), "--run.output_dir", str(out)]  # fmt: skip
    result = ok(run_cli(args, nproc=0, env={"HF_TOKEN": secret, "WANDB_MODE": "offline"}))
    assert not wandb or list((out / "wandb").glob("offline-run-*")), "no offline wandb run was written"
    written = [path for path in out.rglob("*") if path.is_file()]
    assert {"config.yaml", "run.json", "summary.json", "metrics.jsonl", "config.json"} <= {p.name for p in written}
    for token in (secret, file_secret):
        assert token not in result.stdout + result.stderr
        for path in written:
            assert token.encode() not in path.read_bytes(), path
    assert "run-***" in (out / "config.yaml").read_text()  # masked, not dropped
    progress = [line.split("launch.progress: ")[1].split(" | ")[0] for line in result.stderr.splitlines()
                if "launch.progress: step" in line]  # fmt: skip
    assert progress == ["step 2/6", "step 4/6", "step 6/6"]  # stderr is a pipe here: lines, not a bar
    assert Image.open(out / "loss.png").size[0] > 500
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"final_eval_loss", "best_eval_loss", "steps", "epochs", "wall_time_s", "supervised_tokens",
                            "input_tokens", "mean_tokens_per_s", "mean_mfu", "peak_memory_gib_per_rank", "checkpoints",
                            "final"}  # fmt: skip
    assert summary["steps"] == 6 and summary["checkpoints"] and len(summary["peak_memory_gib_per_rank"]) == 1
    record = json.loads((out / "run.json").read_text())
    assert record["world_size"] == 1 and record["devices"] and "launch.train" in record["command"]
    assert set(record["versions"]) >= {"torch", "transformers", "shardtune"} and "commit" in record["git"]
    steps, evals = read_metrics(out)
    assert all({"time", "elapsed_s"} <= set(r) for r in steps + evals)
    assert [r["epoch"] for r in steps] == [round(s / 250, 4) for s in range(1, 7)]  # 2000 examples / batch 8
    assert all(r["eval_perplexity"] > 1 for r in evals)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    chat = [{"role": "user", "content": "What is 1 plus 1?"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        "<s>[INST] What is 1 plus 1? [/INST]"
    )
    # final/ serves the ids the model trained on, a control string in user text kept as text
    from backbones import build_backbone
    from launch.data import encode_prompt

    backbone = build_backbone("llama2-tiny-chat", load_weights=False)
    turns = [("Write <s> and </s> literally", "42"), ("again", "ok")]
    ids, _ = encode_prompt(backbone.prompt_builder_fn("x").build(turns), backbone.tokenizer)
    conversation = [{"role": r, "content": c} for turn in turns for r, c in zip(("user", "assistant"), turn)]
    served = tokenizer.apply_chat_template(conversation, tokenize=True)
    assert list(served["input_ids"] if hasattr(served, "keys") else served) == ids
