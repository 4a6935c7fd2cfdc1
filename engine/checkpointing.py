"""When the training state is saved: mid-epoch, on a stop signal, and after every epoch.

Two calls from the loop: `after_update` (every update; saves every `every` updates and when a
stop signal arrived, then stops) and `end_of_epoch`; evaluation polls for stop signals between
batches (`poll`). What is saved is TrainingState.state_dict();
how it is written (atomically, with a checksum, pruning old files) is the saver's business
(engine/checkpoint.py).
"""

from engine.guard import Guard
from engine.state import TrainingState


class Checkpointer:
    """`saver`: a CheckpointSaver (rank 0) or NullSaver (the other processes, and tools that
    keep nothing); every process calls both methods, since saving gathers their RNG states."""

    def __init__(self, saver, guard: Guard, every: int | None, batches_per_epoch: int):
        self.saver = saver
        self.guard = guard
        self.every = every  # trainer.checkpoint_every_updates; None: at the end of epochs alone
        self.batches_per_epoch = batches_per_epoch

    def after_update(self, state: TrainingState, applied: bool, stop: int) -> None:
        """After an update (`applied`: not skipped by the guard), or while evaluating (`applied`
        False): save mid-epoch every `every` updates, and when `stop` (a signal's number, agreed
        by the processes; 0: none) asks for it, then stop."""
        # a skipped update leaves the step where it was: that step's file is already written.
        # The epoch's last update is followed by the end-of-epoch checkpoint instead.
        periodic = (
            applied
            and self.every is not None
            and state.step % self.every == 0
            and state.position.batches < self.batches_per_epoch
        )
        if stop or periodic:
            self._save(state, is_best=False)
        if stop:
            self.guard.stop(stop)

    def poll(self, state: TrainingState) -> None:
        """While evaluating, after each batch: a stop signal saves where training stands (the
        epoch's batches done, not yet evaluated) and stops, or evaluation goes on if the earlier
        handler lets it (engine/stop.py)."""
        self.after_update(state, applied=False, stop=self.guard.poll())

    def end_of_epoch(self, state: TrainingState, is_best: bool) -> None:
        """The epoch is done and evaluated: save it; stop if a signal came after its last update."""
        self._save(state, is_best)
        signum = self.guard.end_of_epoch()
        if signum:
            self.guard.stop(signum)

    def _save(self, state: TrainingState, is_best: bool) -> None:
        position = state.position  # None at the end of an epoch
        self.saver.save(
            state.state_dict(),
            epoch=state.epoch,
            is_best=is_best,
            batches=position.batches if position is not None else None,
        )
