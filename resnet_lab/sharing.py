"""How the jobs of one sweep share a machine: each of N parallel jobs (Hydra's joblib launcher)
takes its own GPU, or a known share of one, and 1/N of the CPU threads; and a job that runs in
the same process as others (Hydra's basic launcher) leaves torch's global settings as it found
them."""

import contextlib
import logging
import os
import socket
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from resnet_lab import locks

log = logging.getLogger("resnet_lab")

JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def parallel_jobs() -> int:
    """How many of this sweep's jobs run at once on this machine: the joblib launcher's n_jobs
    (-1 or less: joblib's count of CPUs less |n_jobs| - 1), capped by the batch the sweeper
    launches at a time (the search's n_jobs); 1 for any other launcher, whose jobs run one after
    another or (SLURM) on nodes of their own."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return 1
    hydra = HydraConfig.get()
    if hydra.launcher.get("_target_") != JOBLIB:
        return 1
    n_jobs = hydra.launcher.get("n_jobs") or 1
    jobs = n_jobs if n_jobs > 0 else max(1, cores() + 1 + n_jobs)
    batch = hydra.sweeper.get("n_jobs")
    return max(1, min(jobs, batch)) if isinstance(batch, int) and batch > 0 else jobs


@contextlib.contextmanager
def slot(sweep_dir: Path, jobs: int):
    """The lowest of this machine's `jobs` slots that no other live job holds, while inside (a
    flock in <sweep dir>/.slots, named by host, so a shared sweep folder serves many machines)."""
    folder = Path(sweep_dir) / ".slots"
    folder.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    for number in range(jobs):
        fd = locks.take(folder / f"{host}.{number}.lock", block=False)
        if fd is not None:
            try:
                yield number
            finally:
                os.close(fd)
            return
    yield HydraConfig.get().job.num % jobs  # a job beyond n_jobs: not expected, shared then


@contextlib.contextmanager
def torch_state():
    """torch's process-wide settings as they were on entry, again on exit: a deterministic job
    does not leave the next job deterministic, nor a job its thread count or GPU to the next."""
    threads = torch.get_num_threads()
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    matmul = torch.get_float32_matmul_precision()
    gpu = torch.cuda.current_device() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn
        torch.set_float32_matmul_precision(matmul)
        if gpu is not None:
            torch.cuda.set_device(gpu)


def place(number: int, jobs: int, device_type: str) -> str:
    """Put parallel job `number` of `jobs` on its GPU and its CPU threads; what it got, to log."""
    threads = max(1, cores() // jobs)
    torch.set_num_threads(threads)
    where = f"{threads} CPU thread{'s' * (threads > 1)}"
    if device_type in ("auto", "cuda") and torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        torch.cuda.set_device(number % gpus)
        share = f", shared by {-(-jobs // gpus)} jobs" if jobs > gpus else ""
        where = f"GPU {number % gpus} of {gpus}{share}, {where}"
    return f"parallel job slot {number} of {jobs} on this machine: {where}"


@contextlib.contextmanager
def machine_share(device_type: str, world_size: int):
    """Around one job: torch's global state kept, and, as one of several parallel jobs, its own
    slot of the machine (not for a job that starts ranks of its own: they split the machine)."""
    with torch_state():
        jobs = parallel_jobs()
        if jobs == 1 or world_size > 1:
            yield
            return
        with slot(Path(HydraConfig.get().sweep.dir), jobs) as number:
            log.info(place(number, jobs, device_type))
            yield
