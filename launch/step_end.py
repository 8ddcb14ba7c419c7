"""What happens at a step boundary besides training: periodic checkpoints, and on a preemption signal (agreed by
every rank) a checkpoint, the `preempted` marker and a stop."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from fsdp import DistEnv
from fsdp.checkpoint import Checkpointer
from launch.config import CheckpointConfig
from launch.preemption import PreemptionHandler, write_marker
from launch.trainer import Trainer


class StepEnd:
    """Callable passed to `Trainer.fit`; returns True to stop training."""

    def __init__(self, checkpoint: CheckpointConfig, checkpointer: Checkpointer, preemption: PreemptionHandler,
                 env: DistEnv, run_dir: Path, identity: dict, hf_extras: Callable[[Path], None]) -> None:
        self.every = checkpoint.every_steps
        self.checkpointer, self.preemption, self.env = checkpointer, preemption, env
        self.run_dir, self.identity, self.hf_extras = run_dir, identity, hf_extras

    def save(self, trainer: Trainer) -> None:
        self.checkpointer.save(trainer.step, trainer.model, trainer.optimizer, trainer.state_dict(), self.identity,
                               extras_writer=self.hf_extras if self.env.is_rank0 else None)

    def __call__(self, trainer: Trainer) -> bool:
        saved = bool(self.every) and (trainer.step % self.every == 0 or trainer.step == trainer.total_steps)
        if saved:
            self.save(trainer)
        # One collective per step, reached by every rank: nobody acts on a signal only it has seen.
        if trainer.step < trainer.total_steps and self.preemption.agreed(self.env.device):
            if not saved:
                self.save(trainer)
            self.checkpointer.finish()
            if self.env.is_rank0:
                write_marker(self.run_dir, trainer.step, self.preemption.received)
            return True
        return False
