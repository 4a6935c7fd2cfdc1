"""Stop signals: what a cluster sends before it takes the machine away.

SLURM sends SIGTERM at preemption and at the time limit (then SIGKILL after KillWait, 30 s by
default), or the signal of `--signal=USR1@90` ahead of it; submitit's jobs get SIGUSR2. The
handler only notes the signal: the loop checks `requested` at each update, writes a checkpoint of
where it is, and calls `leave()`, which hands over to the handler that was there before
(submitit's requeues the job) or exits with status 128 + signal number.
"""

import logging
import signal
import threading

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

    def after_checkpoint(self) -> None:
        """The checkpoint is written: the earlier handler decides, or the process exits."""
        signum, self.requested = self.requested, None
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, None)  # submitit's requeues and exits; its SIGTERM handler returns
            return
        self._restore()
        raise SystemExit(128 + signum)
