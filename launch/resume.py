"""Which checkpoint a run continues from (`run.resume: auto | never | <path>`), decided before any process group
starts, and the identity a checkpoint records so that a run never resumes another model's or recipe's state."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import yaml

from fsdp.checkpoint import find_latest_checkpoint, read_checkpoint_meta
from launch.config import Config, dump_config

log = logging.getLogger(__name__)


class ResumeError(ValueError):
    pass


def config_digest(config: Config) -> str:
    """Digest of what defines the training trajectory (model, data, train, fsdp), not where it is written."""
    sections = yaml.safe_load(dump_config(config))
    relevant = {k: sections[k] for k in ("model", "data", "train", "fsdp")}
    return hashlib.sha256(yaml.safe_dump(relevant, sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_identity(config: Config, world_size: int) -> dict:
    return {"backbone": config.model.backbone, "stage": config.train.stage, "world_size": world_size,
            "config_digest": config_digest(config)}


def select_checkpoint(config: Config) -> Path | None:
    resume = config.run.resume
    if resume == "never" or (config.run.overwrite and (Path(config.run.output_dir) / "final").exists()):
        return None  # starting fresh (an overwritten finished run's checkpoints are about to be removed)
    if resume == "auto":
        path = find_latest_checkpoint(Path(config.run.output_dir) / "checkpoints")
    else:
        path = Path(resume)
        try:
            read_checkpoint_meta(path)
        except ValueError as error:
            raise ResumeError(f"--run.resume={resume}: {error}; give a complete checkpoint directory "
                              "(checkpoints/step-NNNNNN), auto or never") from None
    if path is None:
        return None
    meta = read_checkpoint_meta(path)
    mismatched = [f"{key} '{meta.get(key)}' (checkpoint) vs '{value}' (--{section}.{key})"
                  for section, key, value in (("model", "backbone", config.model.backbone),
                                              ("train", "stage", config.train.stage)) if meta.get(key) != value]
    if mismatched:
        raise ResumeError(f"cannot resume from {path}: " + "; ".join(mismatched) + ". Use a new --run.output_dir, "
                          "or --run.resume never to start from the pretrained weights")
    if meta.get("config_digest") != config_digest(config):
        log.warning("resuming %s with a changed configuration (model/data/train/fsdp differ from the saved run)", path)
    log.info("resuming from %s (step %d, saved by %d ranks)", path, meta["step"], meta["world_size"])
    return path
