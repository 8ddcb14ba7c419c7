"""What happens at a step boundary besides training: the checkpoint manager's "save now?", and on a preemption signal
(agreed by every rank) a checkpoint, the `preempted` marker and a stop."""

from __future__ import annotations

from pathlib import Path

from fsdp import is_rank0
from fsdp.checkpoint import CheckpointManager
from launch.preemption import PreemptionHandler, write_marker
from launch.trainer import Trainer


class StepEnd:
    """Callable passed to `Trainer.fit`; returns True to stop training."""

    def __init__(self, checkpoints: CheckpointManager, preemption: PreemptionHandler, run_dir: Path) -> None:
        self.checkpoints, self.preemption, self.run_dir = checkpoints, preemption, run_dir

    def save(self, trainer: Trainer, force: bool = False) -> bool:
        return self.checkpoints.save(
            trainer.step,
            trainer.model,
            trainer.optimizer,
            trainer.state_dict(),
            last_step=trainer.step == trainer.total_steps,
            force=force,
        )

    def __call__(self, trainer: Trainer) -> bool:
        saved = self.save(trainer)
        # One collective per step, reached by every rank: nobody acts on a signal only it has seen.
        if trainer.step < trainer.total_steps and self.preemption.agreed(trainer.env.device):
            if not saved:
                self.save(trainer, force=True)
            self.checkpoints.finish()
            if is_rank0():
                write_marker(self.run_dir, trainer.step, self.preemption.received)
            return True
        return False
