"""Llama 3 and Qwen3 end to end on their tiny offline models, built on the released tokenizers (Qwen3's tied, as
Qwen3-0.6B is): 1 and 2 processes train alike, a SIGKILLed run resumes bitwise, last-layer leaves the rest
bit-identical, LoRA's merged export is the base plus the adapter, final/ loads in plain transformers and generates,
its chat template gives the training ids, and a tie stays one parameter through sharding, the optimizer, resume and
the export. One 2-process launch per family runs the full, last-layer and LoRA variants."""

from __future__ import annotations

import json
import signal
import time

import pytest
import torch
from conftest import FP32, ForkedRun, assert_runs_match, load_final, metrics_steps, ok, read_metrics, run_cli
from safetensors.torch import load_file

FAMILIES = {"llama3": ("llama3-tiny-instruct", "recipes/tiny-llama3-full.yaml"),
            "qwen3": ("qwen3-tiny", "recipes/tiny-qwen3-full.yaml")}  # fmt: skip
# 4 examples a step: 2 ranks x 2, or 1 x 4; every rank a single micro-step
COMMON = ["--train.eval_every", "-1", *FP32, "--train.global_batch_size", "4", "--train.micro_batch_size", "2",
          "--train.lr", "1e-3", "--data.max_length", "96"]  # fmt: skip
STEPS = 4
FULL = ["--train.max_steps", str(STEPS)]
KILLED = [*FULL, "--checkpoint.every_steps", "2"]
VARIANTS = {"full": FULL, "last-layer": ["--train.stage", "last-layer", "--train.max_steps", "2"],
            "lora": ["--train.stage", "lora", "--train.max_steps", "2", "--lora.rank", "4"]}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(family, backbone id, recipe args, root): root/two/{full,last-layer,lora} from one 2-process launch, root/one the
    full variant on one process."""
    name = request.param
    backbone, recipe = FAMILIES[name]
    root = tmp_path_factory.mktemp(name)
    args = ["--config", recipe, *COMMON]
    ok(run_cli([*args, "--run.output_dir", str(root / "two"), "--variants", json.dumps(VARIANTS)], nproc=2,
               script="train_and_inspect.py"))  # fmt: skip
    ok(run_cli([*args, *FULL, "--train.micro_batch_size", "4", "--run.output_dir", str(root / "one")], nproc=0))
    return name, backbone, args, root


def base_weights(backbone: str) -> dict[str, torch.Tensor]:
    from backbones.registry import get_backbone_spec

    directory = get_backbone_spec(backbone).local_build()
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def inspected(run) -> dict:
    return json.loads((run / "inspect.json").read_text())


@pytest.mark.slow
def test_one_and_two_processes_train_alike(family):
    _, _, _, root = family
    assert_runs_match(root / "one", root / "two" / "full", atol=1e-5)


@pytest.mark.slow
def test_a_sigkilled_run_resumes_bitwise_and_keeps_the_tie(family, tmp_path):
    name, _, args, root = family
    run = tmp_path / "run"
    ranks = ForkedRun([*args, *KILLED, "--run.output_dir", str(run)], 2, log=tmp_path / "ranks.log")
    deadline = time.time() + 180
    while time.time() < deadline and max(metrics_steps(run) or [0]) < 3:  # past the step-2 checkpoint
        time.sleep(0.05)
    ranks.send_signal(signal.SIGKILL)
    ranks.wait(timeout=60)
    assert 3 <= max(metrics_steps(run)) < STEPS
    ok(run_cli([*args, *KILLED, "--run.output_dir", str(run)], nproc=2, script="train_and_inspect.py"))  # resumes
    assert metrics_steps(run) == list(range(1, STEPS + 1))
    reference = root / "two" / "full"
    assert [r["loss"] for r in read_metrics(run)[0]] == [r["loss"] for r in read_metrics(reference)[0]]
    expected, got = load_final(reference), load_final(run)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert inspected(run)["head_is_embedding"] is (name == "qwen3")  # restored once: still one parameter


@pytest.mark.slow
def test_the_tie_is_one_parameter_through_sharding_the_optimizer_and_the_export(family):
    name, _, _, root = family
    tied = name == "qwen3"
    for variant in ("full", "last-layer", "lora"):
        state = inspected(root / "two" / variant)
        assert state["head_is_embedding"] is tied and state["optimizer_params_unique"], (variant, state)
        final = load_final(root / "two" / variant)
        assert ("lm_head.weight" in final) is not tied, variant  # a tied export has no duplicate head
        assert "model.embed_tokens.weight" in final
    assert inspected(root / "two" / "full")["embedding_in_optimizer"] == 1  # held once, trained
    assert inspected(root / "two" / "lora")["embedding_in_optimizer"] == 0  # frozen: adapters only


@pytest.mark.slow
def test_last_layer_trains_the_embedding_the_last_block_and_the_head_only(family):
    _, backbone, _, root = family
    base, trained = base_weights(backbone), load_final(root / "two" / "last-layer")
    last = max(int(k.split(".")[2]) for k in base if k.startswith("model.layers."))
    for key, weight in base.items():
        if key not in trained:
            continue
        should_train = key in ("model.embed_tokens.weight", "lm_head.weight") or key.startswith(f"model.layers.{last}.")
        assert torch.equal(trained[key], weight) is not should_train, key


@pytest.mark.slow
def test_loras_merged_export_is_the_base_plus_the_scaled_adapter(family):
    _, backbone, _, root = family
    run = root / "two" / "lora"
    base, merged = base_weights(backbone), load_final(run)
    adapter = load_file(run / "final" / "adapter" / "adapter_model.safetensors")
    config = json.loads((run / "final" / "adapter" / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    changed = 0
    for key, weight in base.items():
        if key not in merged:
            continue
        prefix = "base_model.model." + key.removesuffix(".weight")
        a, b = adapter.get(f"{prefix}.lora_A.weight"), adapter.get(f"{prefix}.lora_B.weight")
        expected = weight if a is None else weight + scale * (b @ a)
        torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-6, msg=key)
        changed += a is not None
    assert changed == 2 * 7  # every linear layer of both blocks


@pytest.mark.slow
def test_final_loads_in_plain_transformers_generates_and_serves_the_training_ids(family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from backbones import build_backbone
    from launch.data import encode_prompt

    name, backbone_id, _, root = family
    final = root / "two" / "full" / "final"
    model, info = AutoModelForCausalLM.from_pretrained(final, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is (name == "qwen3")
    tokenizer = AutoTokenizer.from_pretrained(final)
    backbone = build_backbone(backbone_id, load_weights=False)
    turns = [("What is the capital of Peru?", "Lima"), ("Write <|eot_id|> <|im_end|> literally", "ok")]
    ids, _ = encode_prompt(backbone.prompt_builder_fn("x").build(turns), backbone.tokenizer)
    conversation = [{"role": r, "content": c} for turn in turns for r, c in zip(("user", "assistant"), turn)]
    served = tokenizer.apply_chat_template(conversation, tokenize=True)
    assert list(served["input_ids"] if hasattr(served, "keys") else served) == ids
    prompt = tokenizer.apply_chat_template(conversation[:1], add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)  # fmt: skip
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def test_lora_with_trained_embeddings_on_a_tied_model_trains_one_shared_copy():
    """peft copies embed_tokens and lm_head to train them: on a tied model the copies are tied too (its
    ensure_weight_tying), so the run trains one matrix, exported once, as the base has one."""
    from backbones import build_backbone
    from backbones.lora import LoraSettings
    from fsdp.export import model_tensor_sources
    from launch.stage import apply_stage

    backbone = build_backbone("qwen3-tiny")
    settings = LoraSettings(4, 8.0, 0.0, backbone.linear_layer_names, True, backbone.tied_embeddings)
    apply_stage(backbone, "lora", settings)
    llm = backbone.llm
    embed, head = llm.model.embed_tokens, llm.lm_head
    assert embed.modules_to_save["default"].weight is head.modules_to_save["default"].weight
    trainable = [n for n, p in llm.named_parameters() if p.requires_grad]
    assert sum("modules_to_save" in n for n in trainable) == 1  # one trained copy, counted once
    names = [name for name, _, _ in model_tensor_sources(llm)]
    assert sum("modules_to_save" in n for n in names) == 1 and not any(n.startswith("lm_head.") for n in names)
