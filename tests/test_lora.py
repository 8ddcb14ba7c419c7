"""The LoRA stage under FSDP2: 1 and 2 processes agree, the base stays bit-identical, the merged export equals the
peft model with the exported adapter, a SIGKILLed run resumes bit-exactly, the optimizer holds only adapter state,
and a checkpoint refuses other LoRA settings by name."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import FP32_SMALL, ForkedRun, metrics_steps, ok, read_metrics, run_cli
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
LORA = [*FP32_SMALL, "--train.stage", "lora", "--lora.rank", "4", "--lora.alpha", "8", "--lora.dropout", "0",
        "--train.lr", "1e-2", "--train.max_steps", "12", "--checkpoint.every_steps", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    ok(run_cli([*LORA, "--train.micro_batch_size", "8", "--run.output_dir", str(root / "one")], nproc=0))
    ok(run_cli([*LORA, "--run.output_dir", str(root / "two")], nproc=2))
    return root / "one", root / "two"


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "adapter" / "adapter_model.safetensors")


def test_one_and_two_processes_with_accumulation_train_the_same_adapters(lora_runs):
    one, two = lora_runs
    a, b = read_metrics(one)[0], read_metrics(two)[0]
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-5)
    assert a[0]["loss"] > a[-1]["loss"]  # it learns
    first, second = adapter(one), adapter(two)
    assert first.keys() == second.keys() and any(".lora_A." in k for k in first)
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=0, atol=1e-4, msg=name)


def checkpoint_tensors(run: Path) -> dict[str, torch.Tensor]:
    from fsdp.checkpoint import checkpoint_tensor_sources, find_latest_checkpoint

    return {name: fetch() for name, _, fetch in checkpoint_tensor_sources(find_latest_checkpoint(run / "checkpoints"))}


def test_the_base_stays_bit_identical_and_only_adapters_train(lora_runs, tiny_dir):
    trained = checkpoint_tensors(lora_runs[1])
    pretrained = load_file(tiny_dir / "model.safetensors")
    from backbones.lora import is_adapter, pretrained_name

    base = {name: t for name, t in trained.items() if not is_adapter(name)}
    assert base and all(".lora_" not in n for n in base)
    for name, tensor in base.items():
        reference = pretrained[pretrained_name(name)]
        assert torch.equal(tensor[: reference.shape[0]], reference), name  # rows added for <PAD> aside
    lora_b = [t for n, t in trained.items() if ".lora_B." in n]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # B starts at zero: every adapter moved


def test_merged_export_and_adapter_give_the_peft_models_logits(lora_runs):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    from backbones.lora import is_adapter, pretrained_name

    run = lora_runs[1]
    # The base the adapters were trained on, from the run's own checkpoint (vocabulary rows for <PAD> included).
    base = LlamaForCausalLM(AutoConfig.from_pretrained(run / "final")).eval()
    base.load_state_dict({pretrained_name(n): t for n, t in checkpoint_tensors(run).items() if not is_adapter(n)})
    with_adapter = PeftModel.from_pretrained(base, run / "final" / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, rtol=0, atol=1e-5)


def test_a_sigkilled_lora_run_resumes_to_bitwise_equal_adapters(lora_runs, tmp_path):
    run = tmp_path / "run"
    args = [*LORA, "--run.output_dir", str(run)]
    ranks = ForkedRun(args, 2, log=tmp_path / "ranks.log")
    deadline = time.time() + 180
    while time.time() < deadline and max(metrics_steps(run) or [0]) < 5:
        time.sleep(0.05)
    ranks.send_signal(signal.SIGKILL)  # both ranks, mid-step
    ranks.wait(timeout=60)
    assert 5 <= max(metrics_steps(run)) < 12
    ok(run_cli(args, nproc=2))
    assert metrics_steps(run) == list(range(1, 13))
    reference = lora_runs[1]
    assert [r["loss"] for r in read_metrics(run)[0]] == [r["loss"] for r in read_metrics(reference)[0]]
    expected, got = adapter(reference), adapter(run)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def optimizer_bytes(run: Path) -> int:
    import torch.distributed.checkpoint as dcp

    from fsdp.checkpoint import find_latest_checkpoint

    metadata = dcp.FileSystemReader(str(find_latest_checkpoint(run / "checkpoints"))).read_metadata()
    return sum(md.size.numel() * md.properties.dtype.itemsize for key, md in metadata.state_dict_metadata.items()
               if key.startswith("optim.state.") and hasattr(md, "size"))  # fmt: skip


def test_the_optimizer_holds_only_adapter_state(lora_runs, reference_run, capsys):
    ratio = optimizer_bytes(lora_runs[1]) / optimizer_bytes(reference_run)  # the same tiny model, trained in full
    with capsys.disabled():
        print(f"\n[lora] optimizer state: {ratio:.2%} of a full fine-tune's (tiny model, rank 4)")
    assert 0 < ratio < 0.05


def test_resuming_with_other_lora_settings_is_refused_by_name(lora_runs, tmp_path):
    from fsdp import DistEnv
    from fsdp.checkpoint import find_latest_checkpoint
    from launch.train import BAD_INPUT, prepare

    checkpoint = find_latest_checkpoint(lora_runs[1] / "checkpoints")
    env = DistEnv(0, 1, 0, 1, torch.device("cpu"), "gloo")
    with pytest.raises(BAD_INPUT) as error:
        prepare([*LORA, "--lora.rank", "8", "--run.resume", str(checkpoint), "--run.output_dir", str(tmp_path)], env)
    assert "lora 'rank=4 alpha=8" in str(error.value) and "'rank=8 alpha=8" in str(error.value)
    assert "(--lora.*)" in str(error.value)
