"""Stop signals: what a cluster sends before it takes the machine away.

SLURM sends SIGTERM at preemption and at the time limit (then SIGKILL after KillWait, 30 s by
default), or the signal of `--signal=USR1@90` ahead of it; submitit's jobs get SIGUSR2. The
handler only notes the signal: the loop checks `requested` at each update, writes a checkpoint of
where it is, and calls `after_checkpoint()`, which hands over to the handler that was there before
(submitit's requeues the job) or exits with status 128 + signal number.

Data-parallel, the processes agree on the signal (the largest number any of them got) in the
update's all-reduce, so all of them stop at the same update even when one alone was signalled.
"""

import logging
import signal
import threading

from engine import distributed

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class StopSignals:
    """Context manager: while inside, SIGTERM / SIGUSR1 / SIGUSR2 set `requested`."""

    def __init__(self):
        self.requested: int | None = None  # the signal's number once one arrived
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signals reach no other
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _note(self, signum, frame) -> None:
        if self.requested is None:
            log.warning(
                "received %s: saving a checkpoint at the next update, then stopping",
                signal.Signals(signum).name,
            )
        self.requested = signum

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def after_checkpoint(self, signum: int) -> None:
        """The checkpoint is written: the earlier handler decides, or the process exits.

        `signum`: the signal all processes agreed on. With an earlier handler and several
        processes, process 0's handler decides for all: submitit's requeues the job from
        process 0 and ends it (the others then leave with status 0, as submitit expects of
        them); one that returns (submitit's for SIGTERM) lets every process go on.
        """
        self.requested = None
        previous = self._previous.get(signum)
        if not callable(previous):
            distributed.barrier()  # process 0's checkpoint is complete before anyone leaves
            self._restore()
            raise SystemExit(128 + signum)
        if distributed.world_size() == 1:
            previous(signum, None)
            return
        if distributed.is_main():
            try:
                previous(signum, None)
            except BaseException:
                distributed.from_main(True)  # the job ends: the others leave too
                raise
            distributed.from_main(False)
        elif distributed.from_main(None):
            self._restore()
            raise SystemExit(0)
