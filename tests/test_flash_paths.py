"""The GPU attention paths on CPU: the real dispatch (transformers' flash path, shardtune's varlen adapter and
batching) with only the CUDA kernels replaced by exact torch stand-ins (tests/standins.py). Every example of a
micro-batch of several rows, packed or not, must get exactly the logits it gets alone."""

from __future__ import annotations

import json

import pytest
import standins
import torch
from conftest import FP32, TINY, ok, read_metrics, run_cli
from torch.utils._python_dispatch import TorchDispatchMode

from launch.config import DataConfig
from launch.data import batch_layout, build_tokenized, collate

KERNELS = ["flash_attention_2", "torch_varlen"]
# The stand-in kernel each path ends in: flash-attn's custom op, and the aten kernel under torch's varlen custom op.
FORWARD_KERNEL = {"flash_attention_2": "flashattn._flash_attn_varlen_forward",
                  "torch_varlen": "aten._flash_attention_forward"}  # fmt: skip


@pytest.fixture
def kernel_model(request, monkeypatch, tiny_dir):
    """(kernel name, the tiny model dispatching to it through transformers, its SDPA twin with the same weights)."""
    from backbones import build_backbone

    kernel = request.param
    standins.CALLS.clear()
    if kernel == "flash_attention_2":
        standins.install_flash_attn(monkeypatch)
    else:
        standins.install_varlen(monkeypatch)
    model = build_backbone("llama2-tiny-chat", attn_implementation=kernel).llm.eval()
    reference = build_backbone("llama2-tiny-chat", attn_implementation="sdpa").llm.eval()
    reference.load_state_dict(model.state_dict())
    return kernel, model, reference


def segments(batch) -> list[tuple[int, int]]:
    cu = batch["cu_seq_lens_q"].tolist()
    return list(zip(cu, cu[1:]))


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("kernel_model", KERNELS, indirect=True)
def test_every_example_of_a_flash_micro_batch_gets_its_own_logits(kernel_model, tiny_backbone, packing):
    kernel, model, reference = kernel_model
    data = build_tokenized(
        DataConfig(path="bundled", format="chat", max_length=96, packing=packing), tiny_backbone, "train"
    )
    examples = [data.dataset[i] for i in range(4)]  # a micro-batch of 4 rows
    batch = collate(examples, tiny_backbone.tokenizer.pad_token_id, batch_layout(packing, kernel))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # one flattened row, no padding
    real = sum(sum(e.get("lengths") or [len(e["input_ids"])]) for e in examples)
    assert batch["input_ids"].shape[1] == real
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0]
        for a, b in segments(batch):
            alone = reference(input_ids=batch["input_ids"][:, a:b], use_cache=False).logits[0]
            torch.testing.assert_close(logits[a:b], alone, rtol=0, atol=1e-5)
    assert len(segments(batch)) >= (8 if packing else 4)
    assert standins.CALLS[FORWARD_KERNEL[kernel]] > 0


@pytest.mark.parametrize("kernel_model", ["flash_attention_2"], indirect=True)
def test_transformers_flash_path_attends_across_packed_examples_of_a_multi_row_batch(kernel_model, tiny_backbone):
    """Why shardtune flattens: packed rows [4, L] with restarting position ids reach FA2 as plain causal rows."""
    _, model, reference = kernel_model
    data = build_tokenized(
        DataConfig(path="bundled", format="chat", max_length=96, packing=True), tiny_backbone, "train"
    )
    rows = collate([data.dataset[i] for i in range(4)], tiny_backbone.tokenizer.pad_token_id, "packed")
    with torch.no_grad():
        logits = model(input_ids=rows["input_ids"], position_ids=rows["position_ids"], use_cache=False).logits
        first, second = data.dataset[0]["lengths"][:2]
        alone = reference(input_ids=rows["input_ids"][:1, first : first + second], use_cache=False).logits
    assert (logits[0, first : first + second] - alone[0]).abs().max() > 0.1


def test_varlen_stand_in_runs_the_installed_torchs_own_signature():
    """The varlen path runs torch's real `varlen_attn` (only its CUDA kernels are replaced): its public signature must
    be the one recorded for this torch, so that a torch that changes it fails here rather than on a GPU."""
    from torch.nn.attention import varlen

    minor = standins.installed_torch_minor()
    if minor not in standins.VARLEN_SIGNATURES:
        pytest.skip(f"no recorded varlen_attn signature for torch {minor}: record it in tests/standins.py")
    assert standins.plain_signature(varlen.varlen_attn) == standins.VARLEN_SIGNATURES[minor]
    assert standins.plain_signature(standins.varlen_attn_2_11) == standins.VARLEN_SIGNATURES["2.11"]


@pytest.mark.parametrize("form", ["installed", "2.11"])
def test_varlen_adapter_is_causal_and_grouped_query_aware_for_each_torch_signature(monkeypatch, tiny_backbone, form):
    """torch 2.11+ take window_size, whose default is not causal; GQA needs enable_gqa (2.13) or repeated K/V (2.11).
    The tiny model has 4 query and 2 key/value heads. `installed` is this torch's own varlen_attn; `2.11` presents
    torch 2.11's signature over it, so that both branches run on either torch."""
    from backbones import build_backbone

    standins.install_varlen(monkeypatch, form)
    standins.CALLS.clear()
    model = build_backbone("llama2-tiny-chat", attn_implementation="torch_varlen").llm.eval()
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 100]])
    with torch.no_grad():
        got = model(input_ids=ids, use_cache=False).logits
        model.config._attn_implementation = "sdpa"
        expected = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert standins.CALLS["aten._flash_attention_forward"] == model.config.num_hidden_layers


class AttentionCalls(TorchDispatchMode):
    """Counts the ops that a forward/backward dispatches (SAC's cached ops never reach it in the recompute)."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op, self.calls = op, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += str(func) == self.op
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kernel", ["sdpa", *KERNELS])
def test_selective_checkpointing_keeps_attention_outputs_for_every_kernel(process_group, monkeypatch, tiny_backbone,
                                                                          kernel):  # fmt: skip
    """Through each kernel's real dispatch (the stand-ins sit where the CUDA kernel would): a training step's forward
    calls attention once per block, backward never again under `selective` (as without checkpointing), and once
    more per block under `full`, which shows the count would catch a recompute."""
    from backbones import build_backbone
    from fsdp import apply_parallelism, build_mesh
    from launch.trainer import token_loss_sum

    standins.install_flash_attn(monkeypatch)
    standins.install_varlen(monkeypatch)
    data = build_tokenized(DataConfig(path="bundled", format="chat", max_length=96), tiny_backbone, "train")
    batch = collate([data.dataset[i] for i in range(4)], tiny_backbone.tokenizer.pad_token_id,
                    batch_layout(False, kernel))  # fmt: skip
    op = {"sdpa": "aten._scaled_dot_product_flash_attention_for_cpu.default",
          "torch_varlen": "torch_attn._varlen_attn.default",
          "flash_attention_2": "flashattn._flash_attn_varlen_forward.default"}[kernel]  # fmt: skip
    calls, grads = {}, {}
    for mode in ("none", "selective", "full"):
        backbone = build_backbone("llama2-tiny-chat", attn_implementation=kernel)
        model = apply_parallelism(backbone.llm, backbone.transformer_layer_cls, build_mesh(process_group, "full"),
                                  param_dtype=None, activation_checkpointing=mode)  # fmt: skip
        standins.CALLS.clear()
        with AttentionCalls(op) as counter:
            token_loss_sum(model, batch, chunk_tokens=64).backward()
        calls[mode] = counter.calls
        if kernel != "sdpa":  # the stand-in kernel itself ran exactly as often
            assert standins.CALLS[FORWARD_KERNEL[kernel]] == counter.calls, (mode, standins.CALLS)
        grads[mode] = torch.cat([p.grad.full_tensor().flatten() for p in model.parameters()])
    layers = tiny_backbone.llm.config.num_hidden_layers
    assert calls == {"none": layers, "selective": layers, "full": 2 * layers}, calls
    torch.testing.assert_close(grads["selective"], grads["none"], rtol=1e-4, atol=1e-4)  # the same step


FP32_PACKED = [
    *TINY,
    *FP32,
    "--data.packing",
    "true",
    "--train.global_batch_size",
    "8",
    "--train.micro_batch_size",
    "4",
    "--train.max_steps",
    "4",
]


@pytest.fixture(scope="module")
def kernel_runs(tmp_path_factory):
    """SDPA and both flash kernels (stand-ins), 4 packed steps each on 2 processes: one launch."""
    out = tmp_path_factory.mktemp("kernels")
    variants = {kernel: ["--model.attn_implementation", kernel] for kernel in ["sdpa", *KERNELS]}
    result = ok(run_cli([*FP32_PACKED, "--run.output_dir", str(out), "--variants", json.dumps(variants)], nproc=2,
                        script="train_with_standins.py"))  # fmt: skip
    return out, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kernel", KERNELS)
def test_short_training_on_each_flash_path_matches_sdpa(kernel_runs, kernel):
    from transformers import AutoModelForCausalLM

    out, stderr = kernel_runs
    assert f"attention: {kernel} (requested), padding-free batches" in stderr
    expected, got = read_metrics(out / "sdpa")[0], read_metrics(out / kernel)[0]
    assert [r["tokens"] for r in got] == [r["tokens"] for r in expected]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in expected], abs=1e-5)
    assert all(r["padding_tokens"] == 0 < r_sdpa["padding_tokens"] for r, r_sdpa in zip(got, expected))  # none computed
    assert [r["input_tokens"] for r in got] == [r["input_tokens"] for r in expected]  # the same real tokens
    # The export names no shardtune-only attention: plain transformers loads it.
    assert AutoModelForCausalLM.from_pretrained(out / kernel / "final").config._attn_implementation in ("sdpa", "eager")
