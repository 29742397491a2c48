"""Data-parallel runs with torch.distributed: which rank this is, the process group, local spawning.

A process learns its rank from torchrun's environment, or from submitit's when it is a task of a
submitit job (on SLURM, one task per GPU; `hydra/launcher=submitit_local` runs the same path).
`device.world_size=N` spawns N local ranks from inside the one Hydra job, so that a run has one
folder, one config and one W&B run.
"""

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.multiprocessing import ProcessExitedException

from resnet_lab.errors import UserError, describe
from resnet_lab.preemption import Stopped

# After one rank ends, the others get this long to finish (rank 0 closing its W&B run, say)
# before they are terminated, and as long again before they are killed.
GRACE_S = 30


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> Ranks:
    """This process's ranks: torchrun's (or our spawn's) variables, else a submitit task's, else one rank.

    A submitit task with company also gets torchrun's variables (MASTER_ADDR: the job's first
    node), so that the process group initialises the same way.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                     int(os.environ.get("LOCAL_RANK", 0)))
    if os.environ.get("SUBMITIT_EXECUTOR"):
        from submitit.helpers import TorchDistributedEnvironment

        env = TorchDistributedEnvironment()
        if env.world_size > 1:
            # One task per GPU: each sees them all and picks its own with set_device.
            env.export(set_cuda_visible_devices=False, overwrite=True)
        return Ranks(env.rank, env.world_size, env.local_rank)
    return Ranks()


def _init(ranks: Ranks) -> None:
    if torch.cuda.is_available():
        if ranks.local_rank < torch.cuda.device_count():
            torch.cuda.set_device(ranks.local_rank)
        # CUDA tensors go through NCCL; CPU ones (the control flags, object broadcasts, barriers)
        # through gloo, so a CPU run on a GPU node works too.
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, rank=ranks.rank, world_size=ranks.world_size)


@contextlib.contextmanager
def process_group(ranks: Ranks):
    """The process group of these ranks while inside (none for one rank), created by the
    outermost caller. Leaving normally or by a stop, the ranks wait for each other first, so
    none ends while rank 0 still writes."""
    owner = ranks.world_size > 1 and not dist.is_initialized()
    if owner:
        _init(ranks)
    try:
        yield
    except SystemExit:
        if owner:
            barrier()
        raise
    else:
        if owner:
            barrier()
    finally:
        if owner:
            dist.destroy_process_group()


def active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place, over all ranks (a no-op for one rank); op is sum, min or max."""
    if active():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
                                    "max": dist.ReduceOp.MAX}[op])
    return tensor


def largest(value: int) -> int:
    """The largest of the ranks' values, on every rank (through gloo: the host does not wait for
    the GPU)."""
    if not active():
        return value
    return int(all_reduce(torch.tensor(value), "max"))


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers of module (batch-norm statistics), in place on every rank."""
    if active():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def broadcast(value):
    """Rank 0's value (any picklable object), on every rank."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value) -> Optional[list]:
    """Every rank's value (any picklable object), in rank order, on rank 0; None on the others."""
    if not active():
        return [value]
    box = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, box, dst=0)
    return box


@contextlib.contextmanager
def rank_0_failure_stops_all():
    """Around work that rank 0 alone does (writing a checkpoint, opening the W&B run): if it
    fails there, every rank stops here, rather than the others waiting for rank 0 at their next
    collective (on NCCL, until its timeout). Rank 0 raises its own error; the others a UserError
    with its message, or, for a bug, a RuntimeError naming it (rank 0 prints the traceback)."""
    failed = None
    try:
        yield
    except Exception as e:  # noqa: BLE001  (raised again below, once every rank knows)
        failed = e
    # Rank 0's one-line message for a mistake the user can fix (None for a bug), and its error.
    shared = broadcast(failed and (describe(failed), f"{type(failed).__name__}: {failed}"))
    if failed:
        raise failed
    if shared:
        message, error = shared
        raise UserError(message) if message else RuntimeError(f"rank 0 failed: {error}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(local_rank: int, world_size: int, port: int, threads: int, reports, fn, args) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    try:
        value = fn(*args)
    except UserError as e:
        reports.put(("error", str(e)))
        raise SystemExit(2) from e
    except Stopped as e:
        reports.put(("stopped", e.signum))
        raise
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    if local_rank == 0:
        reports.put(("value", value))
    # The rank's work is done and its process group destroyed; what remains is the interpreter's
    # teardown, in which gloo's C++ threads now and then still hold tensors and abort the process
    # ("terminate called without an active exception"), failing a run that finished. Skip it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@contextlib.contextmanager
def _forward_sigterm(pids):
    """SIGTERM to this process reaches the ranks, which checkpoint and stop; Ctrl-C reaches them
    from the terminal already (a second one would interrupt them at once), so it is ignored here."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum, frame):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
                signal.SIGINT: signal.signal(signal.SIGINT, lambda signum, frame: None)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def spawn(world_size: int, fn, *args):
    """fn(*args) in world_size local processes, one per rank; returns rank 0's result.

    A rank's UserError, stop (Stopped) or interruption is raised here as it would have been in
    one process; anything else raises torch's error with the rank's traceback.
    """
    threads = max(1, torch.get_num_threads() // world_size)
    reports = torch.multiprocessing.get_context("spawn").SimpleQueue()
    context = torch.multiprocessing.start_processes(
        _worker, args=(world_size, _free_port(), threads, reports, fn, args), nprocs=world_size,
        join=False, start_method="spawn")
    failure = None
    with _forward_sigterm(context.pids()):
        try:
            while not context.join(grace_period=GRACE_S):
                pass
        except ProcessExitedException as e:
            failure = e
    got = {}
    while not reports.empty():
        kind, value = reports.get()
        got.setdefault(kind, value)
    if "stopped" in got:
        raise Stopped(got["stopped"])
    if "error" in got:
        raise UserError(got["error"])
    if failure is not None:
        if failure.exit_code == 130:
            raise KeyboardInterrupt
        raise failure
    return got["value"]
