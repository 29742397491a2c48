"""SIGTERM and SIGINT (a scheduler's preemption, Ctrl-C) become a request to stop after the step.

The training loop checks `StopSignals.signum` after every step; when set, it writes
checkpoints/last.pt and raises `Stopped`, whose exit status is the shell's for that signal
(143 for SIGTERM, 130 for SIGINT). A Ctrl-C after that raises KeyboardInterrupt at once.

In a submitit job (hydra/launcher=submitit_slurm or submitit_local), submitit's preemption signal
(SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise) stops the run the same way; once the run
has stopped, the signal goes on to submitit's own handler, which requeues the job.
"""

import os
import signal
import threading
from typing import Optional

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def submitit_signal() -> Optional[signal.Signals]:
    """The signal submitit sends before SLURM preempts or times out this job; None outside one."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    # As submitit's JobEnvironment reads it.
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


class Stopped(SystemExit):
    """A signal stopped the run after last.pt was written.

    A SystemExit rather than an Exception, so that it passes through Hydra's multirun as well:
    a preempted sweep stops instead of starting its next job.
    """

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


class StopSignals:
    """While active, SIGTERM and SIGINT (and submitit's signal) set `signum` instead of ending
    the process."""

    def __init__(self):
        self.signum = None
        self._previous = {}
        self._requeue = submitit_signal()

    def _handle(self, signum, frame) -> None:
        # No I/O here: the handler may interrupt a write to the same stream.
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def __enter__(self) -> "StopSignals":
        # Only the main thread may set handlers; elsewhere the signals keep their usual effect.
        if threading.current_thread() is threading.main_thread():
            signals = SIGNALS + ((self._requeue,) if self._requeue else ())
            self._previous = {s: signal.signal(s, self._handle) for s in signals}
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # A multirun runs its jobs in one process: leave the handlers as they were.
        previous, self._previous = self._previous, {}
        for s, handler in previous.items():
            signal.signal(s, handler)
        # submitit's handler checkpoints the job itself and requeues it (on rank 0; it does
        # nothing on the others), ending the process; the requeued job resumes from last.pt.
        # Only a run that stopped for the signal is requeued: one that finished, or failed, in
        # the meantime keeps its result.
        if (isinstance(exc, Stopped) and self.signum == self._requeue
                and callable(previous.get(self.signum))):
            previous[self.signum](self.signum, None)
