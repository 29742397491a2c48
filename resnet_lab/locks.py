"""Exclusive file locks (flock) between processes of one machine, or of several on a shared file
system: the kernel, or the NFS server, releases one when its process ends in any way, SIGKILL or a
lost node included."""

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Optional


def take(path: Path, block: bool = True) -> Optional[int]:
    """The lock on path (created if missing) as an open file descriptor, to be closed to release
    it; without block, None when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def held(path: Path):
    """The lock on path while inside, waiting for it first."""
    fd = take(path)
    try:
        yield
    finally:
        os.close(fd)
