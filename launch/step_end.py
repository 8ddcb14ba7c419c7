"""What happens at a step boundary besides training, agreed by every rank through one collective: signals (a stop
with a checkpoint), a checkpoint due by time (rank 0's clock decides), and publishing an async save once every rank's
write is done. Saving on steps and at the last step is the checkpoint manager's own decision."""

from __future__ import annotations

import logging
from pathlib import Path

from fsdp import all_reduce_sum, is_rank0
from fsdp.checkpoint import CheckpointManager
from launch.lifecycle import EXIT_INTERRUPTED, EXIT_PREEMPTED
from launch.preemption import PreemptionHandler, write_marker
from launch.trainer import Trainer

log = logging.getLogger(__name__)


class Stopped(Exception):
    """Training stopped at a step boundary on a signal, after a checkpoint; `status` is the exit status."""

    def __init__(self, step: int, status: int) -> None:
        super().__init__(f"stopped at step {step}")
        self.step, self.status = step, status


class StepEnd:
    """Callable passed to `Trainer.fit`; raises Stopped after a checkpoint when a signal asked for it."""

    def __init__(self, checkpoints: CheckpointManager, preemption: PreemptionHandler, run_dir: Path) -> None:
        self.checkpoints, self.preemption, self.run_dir = checkpoints, preemption, run_dir

    def __call__(self, trainer: Trainer) -> None:
        votes = [*self.preemption.votes(), *self.checkpoints.votes()]
        interrupted, preempted, time_due, writes_done = all_reduce_sum(votes, trainer.env.device)
        self.checkpoints.publish_if_written(writes_done)
        stop = bool(interrupted or preempted)
        last = trainer.step == trainer.total_steps
        scores = trainer.scores if trainer.scores_step == trainer.step else None  # an evaluation at this step
        self.checkpoints.save(trainer.step, trainer.model, trainer.optimizer, trainer.state_dict(), last_step=last,
                              force=stop or bool(time_due), scores=scores)  # fmt: skip
        if stop and not last:
            self.checkpoints.finish()
            status = EXIT_PREEMPTED if preempted else EXIT_INTERRUPTED
            if is_rank0():
                if preempted:
                    write_marker(self.run_dir, trainer.step, self.preemption.received)
                    log.warning("preempted: checkpoint at step %d saved; exiting with status %d for a requeue",
                                trainer.step, status)  # fmt: skip
                else:
                    log.warning("interrupted (SIGINT): checkpoint at step %d saved; run the same command again to "
                                "continue", trainer.step)  # fmt: skip
            raise Stopped(trainer.step, status)
