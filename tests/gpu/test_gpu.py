"""The GPU path on a real GPU (`make gpu-check`; skipped with the reason elsewhere): NCCL, bf16 compute over fp32
master weights, every flash kernel against SDPA with a mask, both stages, accumulation and activation-checkpointing
memory, CPU offload beside NCCL, the profiler's CUDA memory snapshot and the generation evals on the GPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # conftest helpers
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from conftest import TINY, ok, read_metrics, run_cli  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
BF16 = ["--fsdp.mixed_precision", "bf16", "--export.dtype", "bf16"]


def inspect(tmp_path: Path, *args: str) -> dict:
    ok(run_cli([*TINY, *BF16, "--train.max_steps", "2", "--run.output_dir", str(tmp_path / "run"), *args], nproc=0,
               script="train_and_inspect.py"))  # fmt: skip
    return json.loads((tmp_path / "run" / "inspect.json").read_text())


def test_nccl_group_and_bf16_compute_over_fp32_master_weights(tmp_path):
    inspected = inspect(tmp_path)
    assert "nccl" in inspected["backend"]
    assert inspected["param_dtypes"] == ["torch.float32"] and inspected["compute_dtype"] == "torch.bfloat16"
    assert inspected["param_devices"] == ["cuda:0"]


def test_cpu_offload_keeps_state_on_the_cpu_beside_nccl_and_exports(tmp_path):
    inspected = inspect(tmp_path, "--fsdp.cpu_offload", "true")
    assert "cpu:gloo" in inspected["backend"] and "cuda:nccl" in inspected["backend"]
    assert inspected["offload_to_cpu"] == [True] and inspected["param_devices"] == ["cpu"]
    assert inspected["optimizer_state_devices"] == ["cpu"]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("stage", ["full", "last-layer"])
def test_two_steps_of_each_stage_train_on_the_gpu(tmp_path, stage):
    out = tmp_path / stage
    ok(run_cli([*TINY, *BF16, "--train.stage", stage, "--train.max_steps", "2", "--run.output_dir", str(out)], nproc=0))
    steps, _ = read_metrics(out)
    assert [r["step"] for r in steps] == [1, 2] and all(r["loss"] == r["loss"] for r in steps)
    assert all(r["tflops"] > 0 for r in steps)


def test_profile_steps_write_a_trace_and_a_cuda_memory_snapshot_and_generation_evals_run(tmp_path):
    import pickle

    out = tmp_path / "run"
    args = [
        "--train.max_steps",
        "4",
        "--run.profile_steps",
        "2:3",
        "--eval.generate_every",
        "4",
        "--eval.generate_count",
        "8",
        "--eval.max_new_tokens",
        "4",
        "--run.output_dir",
        str(out),
    ]
    ok(run_cli([*TINY, *BF16, *args], nproc=0))
    trace = json.loads((out / "profile" / "trace-rank0.json").read_text())
    assert any(e.get("cat") == "kernel" for e in trace["traceEvents"])  # CUDA kernels, not only CPU ops
    snapshot = pickle.loads((out / "profile" / "memory-rank0.pickle").read_bytes())
    assert snapshot["segments"] and snapshot["device_traces"]
    _, evals = read_metrics(out)
    assert [r["step"] for r in evals if "gen_exact_match" in r] == [0, 4]


@pytest.fixture(scope="module")
def gpu_group():
    from fsdp import init_distributed, read_env, teardown

    env = read_env()
    init_distributed(env)
    yield env
    teardown()


def flash_kernels() -> list[str]:
    from launch.attention import FLASH_KERNELS, kernel_problem

    return [k for k in FLASH_KERNELS if kernel_problem(k, torch.device("cuda", 0), "bf16") is None]


@pytest.mark.parametrize("kernel", ["flash_attention_2", "torch_varlen"])
def test_flash_kernel_gives_each_packed_example_the_logits_sdpa_gives_it_with_a_mask(kernel, tiny_backbone):
    from backbones import build_backbone
    from launch.config import DataConfig
    from launch.data import build_tokenized, collate

    if kernel not in flash_kernels():
        pytest.skip(f"{kernel} does not run here")
    model = build_backbone("llama2-tiny-chat", attn_implementation=kernel).llm.to("cuda", torch.bfloat16).eval()
    data = build_tokenized(DataConfig(path="bundled", format="chat", max_length=128, packing=True), tiny_backbone,
                           "train")  # fmt: skip
    rows = [data.dataset[i] for i in range(4)]
    flat = {k: v.cuda() if torch.is_tensor(v) else v for k, v in collate(rows, 0, "flat").items()}
    cu = flat["cu_seq_lens_q"].tolist()
    examples = [{"input_ids": flat["input_ids"][0, a:b].tolist(), "labels": [0] * (b - a)} for a, b in zip(cu, cu[1:])]
    padded = {k: v.cuda() for k, v in collate(examples, tiny_backbone.tokenizer.pad_token_id, "padded").items()}
    with torch.no_grad():
        got = model(**{k: v for k, v in flat.items() if k != "labels"}, use_cache=False).logits[0].float()
        model.config._attn_implementation = "sdpa"
        ref = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits.float()
    for i, (a, b) in enumerate(zip(cu, cu[1:])):
        scale = ref[i, : b - a].abs().max()
        assert (got[a:b] - ref[i, : b - a]).abs().max() <= 0.02 * scale + 1e-2, (kernel, i)


def peak(gpu_group, micro_batches: int, checkpointing: str = "none", rows: int = 1, seq: int = 2048) -> dict:
    import harness

    shape = {**harness.LLAMA_1B, "num_hidden_layers": 8}  # ~0.5B: quick, and memory well above the noise
    model, flops, decay = harness.build_model(shape, gpu_group, harness.Variant(activation_checkpointing=checkpointing))
    data = harness.synthetic_packed(shape["vocab_size"], seq, rows=rows * micro_batches * 3)
    trainer = harness.build_trainer(model, flops, decay, gpu_group, data, "sdpa", rows, rows * micro_batches, 3)
    result = harness.measure(trainer, warmup=1, timed=1)
    del model, trainer
    torch.cuda.empty_cache()
    return result


def test_eight_accumulation_micro_steps_cost_at_most_10_percent_more_memory_than_one(gpu_group):
    one, eight = peak(gpu_group, 1)["peak_memory_gib"], peak(gpu_group, 8)["peak_memory_gib"]
    assert eight <= 1.1 * one, (one, eight)


def test_activation_checkpointing_lowers_peak_memory(gpu_group):
    off, on = peak(gpu_group, 1, rows=2, seq=4096), peak(gpu_group, 1, checkpointing="full", rows=2, seq=4096)
    # What a step adds above weights and optimizer state: activations (and logits, which checkpointing keeps).
    added_off = off["peak_memory_gib"] - off["static_memory_gib"]
    added_on = on["peak_memory_gib"] - on["static_memory_gib"]
    assert added_on < 0.75 * added_off, (off, on)
