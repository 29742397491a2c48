"""One live run per run folder: an exclusive flock on <run_dir>/.lock while a run works there.

The kernel (or, on NFS, the server) releases a flock when its process ends in any way, SIGKILL
included, so a dead holder never blocks the folder: the next run takes the lock at once, and the
holder's record it finds in the file (a clean release removes the file) says whose run ended
without letting go. docs/reliability.md says what this guarantees on network file systems.

Hydra writes a job's record (.hydra) before the job can look at the lock: the holder keeps its
own in the lock file, and a run it refuses puts it back.
"""

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Dict, Optional

from resnet_lab import distributed
from resnet_lab.checkpoint import _atomic_write
from resnet_lab.errors import UserError

log = logging.getLogger("resnet_lab")

LOCK_FILE = ".lock"
# What a file system without locks answers (Lustre mounted without flock, say).
UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


def _holder(path: Path) -> Dict:
    """What a lock file says of its holder: {} if it names no one (yet)."""
    try:
        who = json.loads(path.read_text())
        return {"name": f"pid {who['pid']} on host {who['host']}, started {who['started']}",
                "files": who.get("files", {})}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _put(run_dir: Path, files: Dict[str, str]) -> None:
    """Write files (relative path: text) into run_dir; one that fails costs only itself."""
    for name, text in files.items():
        with contextlib.suppress(OSError):
            _atomic_write(run_dir / name, lambda f: f.write(text.encode()))


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == path.stat().st_ino
    except FileNotFoundError:
        return False


def acquire(run_dir: Path, files: Dict[str, str]) -> Optional[int]:
    """Lock run_dir for this process, whose own versions of `files` (relative path: text) it
    holds there; returns the lock's file descriptor (None where the file system cannot lock), or
    raises UserError naming the run that holds it."""
    path = run_dir / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _holder(path)
            _put(run_dir, holder.get("files", {}))
            name = holder.get("name", "a process that has not written its name yet")
            raise UserError(f"run folder {run_dir} is in use by another run ({name}); wait for it to "
                            f"end, or choose another folder (hydra.run.dir, or hydra.sweep.dir for -m)") from None
        except OSError as e:
            os.close(fd)
            if e.errno not in UNSUPPORTED:
                raise
            log.warning(f"{run_dir}: this file system cannot lock files ({e.strerror}), so nothing stops "
                        f"a second run from writing into this folder at the same time")
            return None
        # The holder before removed the file between our open and our lock: lock the new one.
        if _same_file(fd, path):
            break
        os.close(fd)
    previous = _holder(path)
    if previous:
        log.warning(f"{run_dir}: the run that held this folder ({previous['name']}) ended without releasing it "
                    f"(killed, or its node lost); taking it over")
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "files": files}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    _put(run_dir, files)  # over those of a run refused before this one held the folder
    return fd


def release(run_dir: Path, fd: int) -> None:
    # Removed before it is unlocked: a run that opened it meanwhile sees that it is gone.
    with contextlib.suppress(OSError):
        os.unlink(run_dir / LOCK_FILE)
    os.close(fd)


@contextlib.contextmanager
def held(run_dir: Path, main: bool = True, files: Optional[Dict[str, str]] = None):
    """run_dir locked by rank 0 (main) while inside, with its `files` (see acquire); every rank
    stops with its error if it cannot."""
    fd = None
    with distributed.rank_0_failure_stops_all():
        if main:
            fd = acquire(Path(run_dir), files or {})
    try:
        yield
    finally:
        if fd is not None:
            release(Path(run_dir), fd)
