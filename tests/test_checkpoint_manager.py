"""The CheckpointManager in one process (a one-process gloo group): the save policy, publishing and pruning, which
checkpoint a resume picks and what it refuses, a resume that restores the saved state, and the offline export reader.
The multi-process behaviour (SIGKILL, world-size changes) is in test_checkpoint.py."""

from __future__ import annotations

import pytest
import torch

from backbones import build_backbone
from fsdp import apply_parallelism, build_mesh
from fsdp.checkpoint import (
    CheckpointError,
    CheckpointManager,
    SavePolicy,
    checkpoint_tensor_sources,
    find_latest_checkpoint,
    list_checkpoints,
)
from fsdp.materialize import materialize

IDENTITY = {"backbone": "llama2-tiny-chat", "stage": "full", "world_size": 1, "config_digest": "abc"}
FLAGS = {"backbone": "--model.backbone", "stage": "--train.stage"}


def manager(root, every=2, keep=2, **identity) -> CheckpointManager:
    return CheckpointManager(
        root,
        SavePolicy(every_steps=every, keep_last=keep),
        {**IDENTITY, **identity},
        torch.device("cpu"),
        must_match=FLAGS,
    )


@pytest.fixture
def sharded(process_group):
    """The tiny model, built on meta, sharded over the one-process mesh and loaded through the manager."""
    backbone = build_backbone("llama2-tiny-chat", load_weights=False)
    model = apply_parallelism(
        backbone.llm, backbone.transformer_layer_cls, build_mesh(process_group, "full"), param_dtype=None
    )
    materialize(model, process_group.device)
    backbone.init_non_persistent_buffers()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return backbone, model, optimizer


def train_step(model, optimizer) -> None:
    model(input_ids=torch.tensor([[1, 5, 6, 7]]), labels=torch.tensor([[1, 5, 6, 7]])).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_initial_load_saves_on_the_policys_steps_and_keeps_the_newest(sharded, tmp_path):
    backbone, model, optimizer = sharded
    checkpoints = manager(tmp_path / "checkpoints", every=2, keep=2)
    assert checkpoints.load(model, optimizer, None, backbone.pretrained_weights) is None  # the pretrained weights
    reference = build_backbone("llama2-tiny-chat").llm.state_dict()
    assert torch.equal(
        model.state_dict()["model.layers.0.mlp.up_proj.weight"].full_tensor(),
        reference["model.layers.0.mlp.up_proj.weight"],
    )
    saved = [
        step for step in range(1, 8) if checkpoints.save(step, model, optimizer, {"step": step}, last_step=step == 7)
    ]
    assert saved == [2, 4, 6, 7]  # every 2 steps, and the last
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-000007", "step-000006"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000007"
    assert checkpoints.save(8, model, optimizer, {"step": 8}, force=True)  # a preemption forces one


def test_resume_restores_model_optimizer_and_trainer_state(sharded, tmp_path):
    backbone, model, optimizer = sharded
    checkpoints = manager(tmp_path / "checkpoints", every=1)
    checkpoints.load(model, optimizer, None, backbone.pretrained_weights)
    train_step(model, optimizer)
    checkpoints.save(1, model, optimizer, {"step": 1, "note": "kept"})
    expected = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
    train_step(model, optimizer)  # moves away from the checkpoint
    path = checkpoints.select("auto")
    assert path == tmp_path / "checkpoints" / "step-000001"
    assert checkpoints.load(model, optimizer, path, backbone.pretrained_weights) == {"step": 1, "note": "kept"}
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor.full_tensor(), expected[name]), name
    # The offline reader (the export CLI) sees the same tensors with no process group involved.
    offline = {name: fetch() for name, _, fetch in checkpoint_tensor_sources(path)}
    assert offline.keys() == expected.keys() and all(torch.equal(offline[k], expected[k]) for k in expected)


def test_select_picks_the_newest_complete_and_refuses_another_backbone_or_stage(sharded, tmp_path):
    backbone, model, optimizer = sharded
    root = tmp_path / "checkpoints"
    checkpoints = manager(root, every=1, keep=5)
    checkpoints.load(model, optimizer, None, backbone.pretrained_weights)
    for step in (1, 2):
        checkpoints.save(step, model, optimizer, {"step": step})
    (root / "step-000003").mkdir()  # no metadata: a save killed part-way is never picked
    assert find_latest_checkpoint(root) == root / "step-000002"
    assert checkpoints.select("auto") == root / "step-000002"
    assert checkpoints.select("never") is None
    assert checkpoints.select(str(root / "step-000001")) == root / "step-000001"
    with pytest.raises(CheckpointError, match="--run.resume=.*step-000003.*incomplete or unreadable"):
        checkpoints.select(str(root / "step-000003"))
    with pytest.raises(CheckpointError, match=r"stage 'full' \(checkpoint\) vs 'last-layer' \(--train.stage\)"):
        manager(root, stage="last-layer").select("auto")
    with pytest.raises(
        CheckpointError, match=r"backbone 'llama2-tiny-chat' \(checkpoint\) vs 'x' \(--model.backbone\)"
    ):
        manager(root, backbone="x").select("auto")
    assert manager(tmp_path / "empty").select("auto") is None
