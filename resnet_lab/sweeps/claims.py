"""Which process works on which trial: an exclusive flock on <sweep dir>/.trials/<number>.lock,
held by the search process that launched the trial until it has told the study how it ended.

The kernel (or the NFS server) releases a flock when its process ends in any way, SIGKILL or a
lost node included, so a running trial whose lock file exists and can be taken has no live
process: it is stale. A trial without a lock file here is left alone: it was drawn a moment ago,
or by a worker whose sweep folder is not this one (another machine's, not shared). The lock is
taken right after the trial is drawn, so whoever takes it reads the trial's state again under it.
The same folder's .study.lock serialises topping the study up to n_trials.
"""

import contextlib
import os
from pathlib import Path
from typing import Dict

from resnet_lab import locks

FOLDER = ".trials"


class Claims:
    def __init__(self, sweep_dir: Path):
        self.folder = Path(sweep_dir) / FOLDER
        self.folder.mkdir(parents=True, exist_ok=True)
        self.held: Dict[int, int] = {}

    def known(self, number: int) -> bool:
        """Whether a worker of this sweep folder has claimed trial `number`."""
        return (self.folder / f"{number}.lock").exists()

    def hold(self, number: int, block: bool = True) -> bool:
        """Take trial `number`'s lock (waiting for it, with block); whether it was taken."""
        fd = locks.take(self.folder / f"{number}.lock", block)
        if fd is not None:
            self.held[number] = fd
        return fd is not None

    def release(self, number: int) -> None:
        os.close(self.held.pop(number))

    def release_all(self) -> None:
        for number in list(self.held):
            self.release(number)

    @contextlib.contextmanager
    def study(self):
        """The whole study's lock, while inside."""
        with locks.held(self.folder / ".study.lock"):
            yield
