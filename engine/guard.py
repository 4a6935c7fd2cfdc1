"""The loop's one safety object: stop signals and the non-finite update check.

Three calls, one per place: `check()` in the update (the update's one host sync carries both the
non-finite flag and the stop signal), `end_of_epoch()` after an epoch's checkpoint, and `poll()`
while evaluating. When a signal was noted, the caller saves a checkpoint of where training
stands and then calls `stop()`, which exits or hands over to the earlier handler (engine/stop.py).
"""

import logging

import torch
from torch import nn

from engine import distributed
from engine.stop import StopSignals

log = logging.getLogger(__name__)


class Guard:
    """Use as a context manager around training: inside it, SIGTERM / SIGUSR1 / SIGUSR2 are noted.

    An update whose loss or gradient is not finite is skipped: no optimizer, scheduler or EMA
    step, and the BatchNorm statistics its forward passes changed are put back, so the model is
    as it was. After `max_bad_steps` skipped updates in a row the run stops (FloatingPointError).
    `max_bad_steps=None` checks nothing and, in one process, syncs nothing. Data-parallel, the
    processes agree on both the verdict and the signal (one all-reduce per update).
    """

    def __init__(self, model: nn.Module, max_bad_steps: int | None):
        self.enabled = max_bad_steps is not None
        self.max_bad_steps = max_bad_steps
        self.signals = StopSignals()
        self.in_a_row = 0
        # BatchNorm statistics as they were before the current update: put back if it is bad.
        # Taken after each update (and each epoch) rather than before, so `check` is the one call
        # the update makes; nothing but training forward passes changes them in between.
        self.buffers = list(model.buffers()) if self.enabled else []
        self.snapshot = [b.detach().clone() for b in self.buffers]

    def __enter__(self) -> "Guard":
        self.signals.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.signals.__exit__(*exc)

    def check(self, loss: torch.Tensor, grad_norm: torch.Tensor | None, step: int):
        """(apply the update, stop signal number or 0), agreed by all processes."""
        stop = self.signals.requested or 0
        if not self.enabled and distributed.world_size() == 1:
            return True, stop
        bad = torch.zeros((), device=loss.device)
        if self.enabled:
            finite = torch.isfinite(loss)
            if grad_norm is not None:
                finite &= torch.isfinite(grad_norm)
            bad = (~finite).float()
        flags = torch.stack([bad, torch.tensor(float(stop), device=loss.device)])
        bad, stop = distributed.max_over_ranks(flags).tolist()  # the update's one host sync
        if bad:
            self._skipped(step)
        else:
            self.in_a_row = 0
        self._take_snapshot()
        return not bad, int(stop)

    def _skipped(self, step: int) -> None:
        self.in_a_row += 1
        if self.buffers:
            torch._foreach_copy_(self.buffers, self.snapshot)
        log.warning(
            "update %d skipped: non-finite loss or gradient (%d in a row)", step + 1, self.in_a_row
        )
        if self.in_a_row >= self.max_bad_steps:
            raise FloatingPointError(
                f"{self.in_a_row} updates in a row had a non-finite loss or gradient (the last "
                f"would have been update {step + 1}); stopping. The checkpoints hold the last "
                "good weights. Lower optim.lr, set trainer.clip_grad_norm (e.g. 1.0), use "
                "trainer.precision=bf16 instead of fp16, or check the data for NaN; "
                f"trainer.max_bad_steps={self.max_bad_steps} is the limit"
            )

    def _take_snapshot(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.snapshot, self.buffers)

    def end_of_epoch(self) -> int:
        """The signal any process got since the last update (0: none); all processes agree.

        The all-reduce also waits for process 0's end-of-epoch checkpoint. The BatchNorm
        statistics were averaged over the processes after the epoch's last update: the next
        update's snapshot is taken from those.
        """
        self._take_snapshot()
        return int(distributed.max_over_ranks(torch.tensor(self.signals.requested or 0)))

    def poll(self) -> int:
        """During evaluation: the signal this process got (0: none). One process alone can stop
        between batches; data-parallel, the processes stop together at the end of the epoch."""
        if distributed.world_size() > 1:
            return 0
        return self.signals.requested or 0

    def stop(self, signum: int) -> None:
        """The checkpoint is written: exit, or let the earlier handler decide (engine/stop.py)."""
        self.signals.after_checkpoint(signum)
