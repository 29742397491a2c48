"""SIGTERM and SIGINT (a scheduler's preemption, Ctrl-C) become a request to stop after the step.

The training loop checks `StopSignals.signum` after every step; when set, it writes
checkpoints/last.pt and raises `Stopped`, whose exit status is the shell's for that signal
(143 for SIGTERM, 130 for SIGINT). A Ctrl-C after that raises KeyboardInterrupt at once.
"""

import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(SystemExit):
    """A signal stopped the run after last.pt was written.

    A SystemExit rather than an Exception, so that it passes through Hydra's multirun as well:
    a preempted sweep stops instead of starting its next job.
    """

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


class StopSignals:
    """While active, SIGTERM and SIGINT set `signum` instead of ending the process."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        # No I/O here: the handler may interrupt a write to the same stream.
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def __enter__(self) -> "StopSignals":
        # Only the main thread may set handlers; elsewhere the signals keep their usual effect.
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        # A multirun runs its jobs in one process: leave the handlers as they were.
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
