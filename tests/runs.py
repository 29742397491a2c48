"""Helpers for tests that run training in processes of their own: a fresh environment, a run
started in a folder, a run caught at a checkpoint, and what a run folder holds."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from resnet_lab import rundir

# The one tiny run every test starts from (each adds what it is about): 320 training images of
# 28x28 at batch 32, a ResNet-18 of width 8, fp32 on the CPU whatever the CPU's default (bf16,
# where there are bf16 units, is exact only to its rounding: runs compared bit for bit differ).
TINY = ["dataset.download=false", "device=cpu", "device.precision=fp32", "model.width=8", "trainer.batch_size=32",
        "trainer.eval_batch_size=64", "trainer.progress=false"]


def for_kind(overrides) -> list:
    """Overrides less the dataset keys a synthetic or image_folder dataset's schema lacks
    (dataset.download; synthetic: dataset.root too): one tiny-run set serves every kind."""
    absent = {"dataset=synthetic": ("dataset.download=", "dataset.root="),
              "dataset=image_folder": ("dataset.download=",)}
    drop = tuple(prefix for kind, prefixes in absent.items() if kind in overrides for prefix in prefixes)
    return [o for o in overrides if not (drop and o.startswith(drop))]


def metrics(run_dir: Path) -> list:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def epochs(run_dir: Path) -> list:
    """The epochs a run's metrics.jsonl has rows for, in order."""
    return [row["epoch"] for row in metrics(run_dir)]


def fresh_env():
    """A new process as a requeued job would start: its own W&B service, not this process's
    (a SIGKILLed job's stream would otherwise still hold its run id there)."""
    env = dict(os.environ)
    env.pop("WANDB_SERVICE", None)
    return env


def start(args, run_dir: Path, entry=("-m", "resnet_lab"), **popen) -> subprocess.Popen:
    """`python -m resnet_lab args` (or python `entry` args) training in run_dir, its output in
    <run_dir>.log beside it."""
    log = open(run_dir.parent / f"{run_dir.name}.log", "a")
    return subprocess.Popen([sys.executable, *entry, *for_kind(args), f"hydra.run.dir={run_dir}"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=run_dir.parent,
                            env=fresh_env(), **popen)


# `python -c KILLED_AT_RENAME PATTERN OVERRIDES...`: the command, SIGKILLed by itself at the first
# rename of a file named like PATTERN (fnmatch) over its target: nothing after it runs, no
# handler, no `finally`, as under the OOM killer at that instant.
KILLED_AT_RENAME = """
import fnmatch, os, signal, sys
pattern, rename = sys.argv.pop(1), os.replace
def replace(source, target, *args, **kw):
    if fnmatch.fnmatch(os.path.basename(source), pattern):
        os.kill(os.getpid(), signal.SIGKILL)
    return rename(source, target, *args, **kw)
os.replace = replace
from resnet_lab.__main__ import main
main()
"""


def killed_at_rename(pattern: str, args, run_dir: Path) -> None:
    """Run args in run_dir until it SIGKILLs itself about to rename a file named like `pattern`."""
    proc = start(args, run_dir, entry=("-c", KILLED_AT_RENAME, pattern))
    assert proc.wait(timeout=300) == -signal.SIGKILL, (run_dir.parent / f"{run_dir.name}.log").read_text()


def freeze_at(proc: subprocess.Popen, run_dir: Path, target, group: bool = False):
    """Watch last.pt; stop the process at each new version to read its (epoch, step), and leave
    it stopped (SIGSTOP) at the first one at or past `target`."""
    last = rundir.last(run_dir)
    send = (lambda s: os.killpg(proc.pid, s)) if group else (lambda s: os.kill(proc.pid, s))
    seen = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, (run_dir.parent / f"{run_dir.name}.log").read_text()
        try:
            stamp = last.stat().st_mtime_ns, last.stat().st_ino
        except FileNotFoundError:
            stamp = seen
        if stamp != seen:
            send(signal.SIGSTOP)
            seen = last.stat().st_mtime_ns, last.stat().st_ino
            state = torch.load(last, weights_only=True)
            if (state["epoch"], state["step"]) >= target:
                return state["epoch"], state["step"]
            send(signal.SIGCONT)
        time.sleep(0.003)
    pytest.fail(f"no checkpoint at or past {target}")


def stop_at(proc: subprocess.Popen, run_dir: Path, target, signum: int = signal.SIGTERM, group: bool = False,
            to=None) -> int:
    """Catch the run at its first checkpoint at or past target (the process, or its whole group),
    send signum to `to` (a pid; default: what was caught), let it all go on, and return the
    run's exit status."""
    freeze_at(proc, run_dir, target, group)
    if to is not None:
        os.kill(to, signum)
    else:
        (os.killpg if group else os.kill)(proc.pid, signum)
    (os.killpg if group else os.kill)(proc.pid, signal.SIGCONT)
    return proc.wait(timeout=120)


def damage_in_middle(path: Path) -> None:
    """200 bytes of the file overwritten in its middle: torch.load reads a checkpoint so damaged
    without a word. Inverted rather than zeroed, since the middle may hold zeros already (a zip
    record's alignment padding, a zero tensor)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 200] = bytes(b ^ 0xFF for b in data[middle:middle + 200])
    path.write_bytes(bytes(data))


def contents(run_dir: Path) -> dict:
    """Every file the run wrote, its bytes and mtime, except Hydra's record of the latest command,
    the log, and W&B's debug logs (its service may still append to them after the run ends)."""
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*")
            if p.is_file() and ".hydra" not in p.parts and p.name != "train.log"
            and not p.name.startswith("debug")}


def read_only_copy(run_dir: Path, tmp_path: Path, tiny_tmpfs) -> tuple:
    """A copy of run_dir that cannot be written, and the strerror a write into it gets. Root writes
    into any folder: for root the copy is on a tmpfs remounted read-only."""
    root = os.geteuid() == 0
    copy = (tiny_tmpfs(64 << 20) if root else tmp_path) / "run"
    shutil.copytree(run_dir, copy)
    if root:
        subprocess.run(["mount", "-o", "remount,ro", str(copy.parent)], check=True)
    else:
        for path in (copy, *copy.rglob("*")):
            path.chmod(path.stat().st_mode & ~0o222)
    return copy, "Read-only file system" if root else "Permission denied"
