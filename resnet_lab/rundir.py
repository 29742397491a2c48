"""A run's folder: the names of everything in it, whole-file writes, the status file, the lock.

Every module that reads or writes a run folder asks this one for a file's name and writes through
`write_file`, so a kill or a full disk leaves each file whole or as it was.

One live run per folder: an exclusive flock on <run_dir>/.lock while a run works there. The kernel
(or, on NFS, the server) releases a flock when its process ends in any way, SIGKILL included, so a
dead holder never blocks the folder: the next run takes the lock at once, and the holder's record
it finds in the file (a clean release removes the file) says whose run ended without letting go.
docs/reliability.md says what this guarantees on network file systems. Hydra writes a job's record
(.hydra) before the job can look at the lock: the holder keeps its own in the lock file, and a run
it refuses puts it back.
"""


import contextlib
import errno
import json
import logging
import os
import socket
import time
import urllib.parse
import zipfile
from pathlib import Path
from typing import IO, Callable, Dict, List, Optional

from resnet_lab import distributed, locks
from resnet_lab.errors import UserError

log = logging.getLogger("resnet_lab")

# What a file system without locks answers (Lustre mounted without flock, say).
UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)

CHECKPOINTS = "checkpoints"
# Inside CHECKPOINTS: the state to resume from, and the weights of the best epoch (of its EMA
# with an EMA objective) when the run chooses one (config.chooses_best).
LAST, BEST = "last.pt", "best.pt"
EMA = "ema.pt"  # inside CHECKPOINTS: the EMA of the weights at the last checkpoint (with ema.decay)
# Inside CHECKPOINTS: the checkpoint before last.pt, to resume from when last.pt fails its check.
PREVIOUS = "previous.pt"
WEIGHTS_PREFIX = "weights-"  # inside CHECKPOINTS: each checkpoint's weights, in a file of their own
MODEL = "model.pt"  # the final weights
METRICS = "metrics.jsonl"
# What the config left to the machine (device.type auto, precision null, ...) as the last part
# that trained settled it, with the ranks, batches, split sizes and versions (Trainer.runtime_record).
RUNTIME = "runtime.json"
# One word: running (from the start), then finished, failed, stopped (by a signal, after
# writing last.pt), or pruned (a search's pruner stopped it at an epoch's end, after writing
# last.pt). A run killed outright stays "running", which is how `compare` tells an
# interrupted run from a finished one.
STATUS = "status"
EVAL = "eval"  # the run's final confusion matrix, and what `python -m resnet_lab.evaluate` writes
FINAL = "final.json"  # inside EVAL: the last evaluation's classes, confusion matrix and per-class metrics
LOCK = ".lock"
# Hydra's record of a run's command (hydra.output_subdir, as conf/config.yaml leaves it), and
# the copy of it kept beside the checkpoints: that of the last command that trained.
HYDRA_RECORD, KEPT_RECORD = ".hydra", "hydra"
# In a sweep's folder: the sweep's W&B group, drawn by its first job (sweep_group).
SWEEP_GROUP = ".wandb_group"
# In a sweep's folder: a file for each job folder whose latest job failed before it trained
# (hydra_record_kept), so that the sweep's summary does not take an earlier run left there for it.
NOT_RUN = ".not_run"


def last(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS / LAST


def sweep_group(sweep_dir: Path) -> str:
    """The W&B group of the sweep in sweep_dir: its folder's name and an id drawn once and kept
    there, so that every job of the sweep, resumed ones included, shares it and no other sweep
    does (a fixed hydra.sweep.dir repeats its name on every machine and in every project)."""
    path = Path(sweep_dir) / SWEEP_GROUP
    if not path.exists():
        drawn = path.with_name(f".{SWEEP_GROUP}.{os.getpid()}.tmp")
        drawn.write_text(f"{Path(sweep_dir).resolve().name}-{os.urandom(4).hex()}\n")
        try:
            os.link(drawn, path)  # the first job's draw wins, whole, where jobs start at once
        except FileExistsError:
            pass
        finally:
            drawn.unlink()
    return path.read_text().strip()


def _os_error(e: BaseException) -> Optional[OSError]:
    """The OSError behind e, if any: torch.save reports a failed write as a RuntimeError."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e


def temporary(path: Path, kind: str = "tmp") -> Path:
    """The name a file stands under before it is renamed over `path`: .<name>.tmp while it is
    written (atomic_write), .<name>.link as a hard link made to replace it."""
    return path.with_name(f".{path.name}.{kind}")


def remove_leftovers(run_dir: Path) -> None:
    """Remove the temporary files that a kill between a write and its rename left in the run's
    folders (a file written again reuses its temporary name, but each weights file has a new one,
    and a file not written again would keep its own for good). Only for the run that holds the
    folder: no other writer is there."""
    run_dir = Path(run_dir)
    for folder in (run_dir, run_dir / CHECKPOINTS, run_dir / CHECKPOINTS / KEPT_RECORD, run_dir / HYDRA_RECORD,
                   run_dir / EVAL):
        for kind in ("tmp", "link"):
            for path in folder.glob(temporary(Path("*"), kind).name):
                path.unlink(missing_ok=True)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through a temporary file in the same folder, then rename it over path: a kill at
    any moment leaves the old file or the new one, never a torn one."""
    tmp = temporary(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # The rename itself is durable only once the folder is synced.
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _remedy(cause: OSError, folder: Path) -> str:
    if cause.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some space"
    if cause.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"make {folder} writable"
    return f"check {folder}"


def write_file(path: Path, write: Callable[[IO[bytes]], None], after: str = "") -> None:
    """atomic_write, with a failed write (a full disk, a read-only folder) as one line for the
    user; `after`: what to do then."""
    if path.is_dir():  # a path given on a command line: the rename would fail, naming its parent
        raise UserError(f"{path} is a folder, not a file: nothing was written into it; give the path of a "
                        f"file (one inside it, say)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, write)
    except Exception as e:
        cause = _os_error(e)
        if cause is None:
            raise
        kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        raise UserError(f"could not write {path} ({cause.strerror or cause}); {kept}; "
                        f"{_remedy(cause, path.parent)}{after}") from e


def damage(path: Path) -> Optional[str]:
    """What is wrong with a file torch.save wrote, by the CRC-32 of each record that its zip
    stores beside the record, written in the same atomic write (torch.load reads a damaged
    record without a word); None when every record matches, or the file is no zip at all (a
    legacy torch.save, whose reader sees its damage)."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"its zip does not read: {e}"
    return f"record {bad} does not match its stored checksum" if bad else None


def read_status(run_dir: Path) -> Optional[str]:
    path = Path(run_dir) / STATUS
    return path.read_text().strip() if path.exists() else None


def write_status(run_dir: Path, status: str) -> None:
    write_file(Path(run_dir) / STATUS, lambda f: f.write((status + "\n").encode()))


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
            atomic_write(run_dir / name, lambda f: f.write(text.encode()))
def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == path.stat().st_ino
    except FileNotFoundError:
        return False
def acquire(run_dir: Path, files: Dict[str, str]) -> Optional[int]:
    """Lock run_dir for this process, whose own versions of `files` (relative path: text) it
    holds there; returns the lock's file descriptor (None where the file system cannot lock), or
    raises UserError naming the run that holds it."""
    path = run_dir / LOCK
    while True:
        try:
            fd = locks.take(path, block=False)
        except OSError as e:
            if e.errno not in UNSUPPORTED:
                raise
            log.warning(f"{run_dir}: this file system cannot lock files ({e.strerror}), so nothing stops "
                        f"a second run from writing into this folder at the same time")
            return None
        if fd is None:
            holder = _holder(path)
            _put(run_dir, holder.get("files", {}))
            name = holder.get("name", "a process that has not written its name yet")
            raise UserError(f"run folder {run_dir} is in use by another run ({name}); wait for it to "
                            f"end, or choose another folder (hydra.run.dir, or hydra.sweep.dir for -m)")
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
        os.unlink(run_dir / LOCK)
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


def _copy_record(source: Path, target: Path) -> None:
    """The .yaml files of one record folder over another's, each whole or not at all; one that
    fails costs only this convenience, never the run or its own error."""
    try:
        target.mkdir(exist_ok=True)
        for path in source.glob("*.yaml"):
            atomic_write(target / path.name, lambda f: f.write(path.read_bytes()))
    except OSError:
        pass


def keep_hydra_record(run_dir: Path) -> None:
    """Copy Hydra's record of the command training now beside its checkpoints."""
    if (run_dir / HYDRA_RECORD).is_dir():
        _copy_record(run_dir / HYDRA_RECORD, run_dir / CHECKPOINTS / KEPT_RECORD)


def _stamp(path: Path):
    return path.stat().st_mtime_ns if path.exists() else None


@contextlib.contextmanager
def hydra_record_kept(run_dir: Path, sweep_dir: Optional[Path] = None):
    """Around a job in its run folder. Hydra rewrites the folder's .hydra record before the job
    runs, also for a command that then trains nothing (a finished run, a resume into another
    model, a value out of range): the record would name a command the run never trained with,
    and `compare` would show it. A job that leaves the status file untouched trained nothing,
    so the record of the last command that did comes back. A job of the sweep in sweep_dir that
    trained nothing and failed is marked not run there (not_run). Relies on: Hydra writes the
    record before the job runs (tests/test_hydra_contract.py)."""
    status, kept = run_dir / STATUS, run_dir / CHECKPOINTS / KEPT_RECORD
    before = _stamp(status)
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        untouched = _stamp(status) == before
        if untouched and kept.is_dir() and (run_dir / HYDRA_RECORD).is_dir():
            _copy_record(kept, run_dir / HYDRA_RECORD)
        if sweep_dir is not None:
            _mark_not_run(Path(sweep_dir), run_dir, failed and untouched)


def _mark_not_run(sweep_dir: Path, run_dir: Path, not_run: bool) -> None:
    """Mark (or unmark) the job in run_dir as not run; a mark that cannot be written costs only
    the summary's accuracy, never the job or its own error."""
    mark = sweep_dir / NOT_RUN / urllib.parse.quote(os.path.relpath(run_dir, sweep_dir), safe="")
    with contextlib.suppress(OSError):
        if not_run:
            mark.parent.mkdir(exist_ok=True)
            mark.touch()
        else:
            mark.unlink(missing_ok=True)


def not_run(sweep_dir: Path) -> List[Path]:
    """The job folders of the sweep in sweep_dir whose latest job failed before it trained:
    whatever they hold is an earlier run's, not that job's."""
    folder = Path(sweep_dir) / NOT_RUN
    marks = sorted(folder.iterdir()) if folder.is_dir() else []
    return [(Path(sweep_dir) / urllib.parse.unquote(mark.name)).resolve() for mark in marks]
