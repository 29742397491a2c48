"""Wiring: the Hydra task that builds the parts named by the config and runs the epochs."""

import contextlib
import logging
import os
import pickle
import random
import signal
import time
from pathlib import Path

import cloudpickle
import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import configure_log
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

from resnet_lab import checkpoint, distributed, runlock
from resnet_lab import device as device_setup
from resnet_lab.config import register_configs, validate
from resnet_lab.data import build_data
from resnet_lab.engine import RunningTotals, evaluate, train_epoch
from resnet_lab.errors import HeldBack, UserError
from resnet_lab.models import build_model
from resnet_lab.optim import build_optimizer, build_scheduler
from resnet_lab.preemption import StopSignals, Stopped
from resnet_lab.tracking import METRICS_FILE, EpochProgress, Tracker, meaningful, read_status

log = logging.getLogger("resnet_lab")

register_configs()


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace to repeat itself; read when cuBLAS makes its first one.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def check_ranks(cfg: DictConfig, ranks: distributed.Ranks, runtime: device_setup.Runtime) -> None:
    if cfg.device.sync_bn and runtime.device.type != "cuda":
        raise UserError(f"device.sync_bn=true: torch's SyncBatchNorm runs on CUDA only and this run is on "
                        f"{runtime.device.type}; set device=cuda, or leave device.sync_bn=false")
    if runtime.device.type == "cuda" and ranks.local_rank >= torch.cuda.device_count():
        raise UserError(f"{ranks.world_size} ranks: local rank {ranks.local_rank} has no GPU of its own, this "
                        f"node has {torch.cuda.device_count()}; start at most that many ranks per node")


# Settings that change how a run executes, not what it learns (besides tracking.NOISE_KEYS;
# trainer.epochs: a finished run is past any smaller count).
UNTRAINED = ("device", "trainer.epochs", "trainer.checkpoint_every_steps", "trainer.save_weights",
             "trainer.eval_batch_size")


def already_finished(state: dict, path: Path, own: bool, run_dir: Path, cfg: DictConfig) -> bool:
    """Whether the run of checkpoint `state` has nothing left to train and has ended.

    In its own folder (the same command again, a requeued sweep job) such a run is left as it
    is: its weights, metrics, status, checkpoints and W&B run. One killed after its last
    checkpoint, before it wrote model.pt and closed its W&B run, is not finished: it goes on to
    do that. Into a new folder there is nothing to train: a mistake. So is a finished run asked
    for with other settings: its result is not theirs (a sweep rerun into the same folder with
    new values would hand the old accuracies to its sweeper).
    """
    done, epochs = state["epoch"] - 1, cfg.trainer.epochs
    if done < epochs:
        return False
    # Only a run without a schedule can grow (Checkpointer.restore).
    further = (f"set trainer.epochs above {done} to train it further" if cfg.sched.name == "none" else
               f"its sched={cfg.sched.name} spans those {done} epochs: a longer run starts afresh")
    if state["step"]:
        raise UserError(f"{path} is at step {state['step']} of epoch {done + 1}, past trainer.epochs={epochs}; "
                        f"resume with trainer.epochs={state['config']['trainer']['epochs']}, as it was saved")
    if not own:
        raise UserError(f"trainer.resume={path}: that run has trained {done} epochs and trainer.epochs={epochs} "
                        f"leaves nothing to train; {further}")
    if read_status(run_dir) != "finished":
        return False
    # What the run trained must match; where it runs, how it logs and checkpoints need not, and
    # the epoch count may shrink (the run is past it).
    changes = meaningful(checkpoint.config_changes(state["config"], cfg, shared_only=True), also=UNTRAINED)
    if changes:
        raise UserError(f"{run_dir} holds a run that finished with other settings ({'; '.join(changes)}); "
                        f"train these in a new folder (hydra.run.dir, or hydra.sweep.dir for -m)")
    log.info(f"this run has finished its {done} epochs, final test acc {state['metrics']['test_acc']:.4f}: "
             f"nothing to train ({further})")
    return True


def build(cfg: DictConfig, runtime: device_setup.Runtime, ranks: distributed.Ranks):
    """The parts of a run, for this rank: its data, the bare model (the optimizer and checkpoints
    hold it, so a DDP checkpoint resumes in one process), the model that trains (under DDP and
    compiled, as asked), the optimizer, the schedule and the grad scaler."""
    data = build_data(cfg.dataset, cfg.trainer, runtime.device, cfg.seed, runtime.channels_last,
                      ranks.rank, ranks.world_size)
    model = runtime.prepare(build_model(cfg.model, data.in_channels, data.num_classes))
    if cfg.device.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    parallel = model
    if ranks.world_size > 1:
        parallel = DistributedDataParallel(model, device_ids=[ranks.local_rank] if runtime.device.type == "cuda"
                                           else None)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.sched, len(data.train), cfg.trainer.epochs)
    return data, model, runtime.compiled(parallel), optimizer, scheduler, runtime.grad_scaler()


def train(cfg: DictConfig, run_dir: Path) -> float:
    """Train as cfg says, writing into run_dir; returns the final test accuracy.

    As one of several ranks (torchrun, a SLURM task, device.world_size) it trains its part of
    every batch under DDP, and only rank 0 writes and reports.
    """
    validate(cfg)
    ranks = distributed.from_env()
    with distributed.process_group(ranks):
        return _train(cfg, run_dir, ranks)


def _train(cfg: DictConfig, run_dir: Path, ranks: distributed.Ranks) -> float:
    main = ranks.is_main
    if not main:
        log.setLevel(logging.ERROR)  # rank 0 speaks for all
    began = time.perf_counter()
    resume_from = checkpoint.to_resume(cfg.trainer.resume, run_dir)
    state = checkpoint.load(resume_from) if resume_from else None
    own_last = run_dir / checkpoint.FOLDER / checkpoint.LAST
    own = resume_from is not None and resume_from.resolve() == own_last.resolve()
    if state is not None and already_finished(state, resume_from, own, run_dir, cfg):
        return state["metrics"]["test_acc"]
    runtime = device_setup.resolve(cfg.device)
    check_ranks(cfg, ranks, runtime)
    # Its own seed per rank for dropout's masks; the weights start as rank 0's (DDP copies them)
    # and the batches are a function of cfg.seed alone.
    seed_everything(cfg.seed + ranks.rank, cfg.trainer.deterministic)
    data, model, forward, optimizer, scheduler, scaler = build(cfg, runtime, ranks)
    checkpoints = checkpoint.Checkpointer(run_dir, cfg, model, optimizer, scheduler, scaler, runtime.device)
    first_epoch, first_step, totals, best_acc, metrics = 1, 0, None, -1.0, {}
    if state is not None:
        checkpoints.restore(state, resume_from, ranks.rank)
        first_epoch, first_step = state["epoch"], state["step"]
        best_acc, metrics = state["best_acc"], state["metrics"]
        began -= state.get("elapsed", 0.0)  # total_seconds counts the parts before the stop
        if state["totals"] is not None:
            # The saved sums are over all ranks: rank 0 carries them on, the others add to nothing.
            saved = state["totals"] if main else {"seconds": state["totals"]["seconds"]}
            totals = RunningTotals.from_state_dict(saved, runtime.device)
        changes = checkpoint.config_changes(state["config"], cfg)
        log.info(f"resuming from {resume_from} at epoch {first_epoch} step {first_step}")
        if changes:
            log.warning(f"settings differ from the checkpoint's: {'; '.join(changes)}")
    if main:
        checkpoint.keep_epochs(run_dir / METRICS_FILE, first_epoch - 1)

    params = sum(p.numel() for p in model.parameters())
    log.info(f"{cfg.model.name} ({params:,} parameters) on {cfg.dataset.name} "
             f"({data.train.num_samples} train, {data.test.num_samples} test images), "
             f"{runtime.device.type} {runtime.precision}"
             f"{' channels_last' if runtime.channels_last else ''}{' compiled' if runtime.compile else ''}"
             f"{f', {ranks.world_size} ranks' if ranks.world_size > 1 else ''}; writing to {run_dir}")
    steps, every = len(data.train), cfg.trainer.checkpoint_every_steps
    last_good = f"{resume_from} (epoch {first_epoch} step {first_step})" if state is not None else None
    # Reading a CPU tensor costs nothing, so on the CPU a diverged loss stops the very step it
    # appears; on an accelerator it is read only where the host waits anyway (checkpoints).
    check_every_step = runtime.device.type == "cpu"

    def save(epoch: int, step: int, best: bool = False) -> None:
        nonlocal last_good
        whole = totals and totals.reduced()
        rngs = distributed.gather(checkpoint.rng_states(runtime.device))
        # No rank runs ahead of a checkpoint (a job killed later resumes from this one), and
        # every rank learns whether rank 0 could write it (a full disk, say).
        with distributed.rank_0_failure_stops_all():
            if main:
                checkpoints.save(epoch, step, totals=whole and whole.state_dict(), best_acc=best_acc,
                                 metrics=metrics, wandb_run_id=tracker.run_id,
                                 elapsed=time.perf_counter() - began, rngs=rngs, best=best)
        last_good = f"{checkpoints.folder / checkpoint.LAST} (epoch {epoch} step {step})"

    def check_finite(epoch: int) -> None:
        bad = totals.bad_step()
        if bad is not None:
            kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written"
            raise UserError(f"the training loss became NaN or inf at epoch {epoch} step {bad + 1}/{steps}; "
                            f"training stopped and {kept}; lower optim.lr (now {cfg.optim.lr})")

    def stop(signum: int, epoch: int, step: int) -> Stopped:
        log.warning(f"{signal.Signals(signum).name}: stopped at epoch {epoch} step {step}/{steps}; "
                    f"{checkpoints.folder / checkpoint.LAST} written: run the same command to resume")
        return Stopped(signum)

    # The tracker opens only now, when the run is sure to train: a run that fails while setting
    # up (a resume into another model, say) leaves the folder's status and its W&B run as they
    # were. A run resumed in its own folder continues its W&B run rather than starting a second
    # one; a new folder started from another run's checkpoint gets a W&B run of its own. The
    # tracker closes before the signals are handed back (to submitit's requeue, under SLURM).
    own_run_id = state["wandb_run_id"] if own else None
    with StopSignals() as signals, \
            Tracker(run_dir, cfg, resume_id=own_run_id, rank=ranks.rank) as tracker:
        for epoch in range(first_epoch, cfg.trainer.epochs + 1):
            totals = totals or RunningTotals(runtime.device)
            clock = time.perf_counter() - totals.seconds  # a resumed epoch counts its time before the stop

            def on_step(step: int, loss: torch.Tensor) -> None:
                bar.advance()
                tracker.step((epoch - 1) * steps + step + 1, loss)
                done = step + 1
                due = every > 0 and ((epoch - 1) * steps + done) % every == 0 and done < steps
                signum = distributed.largest(signals.signum or 0)  # all ranks stop at the same step
                if check_every_step or due or signum:
                    check_finite(epoch)
                if due or signum:
                    totals.seconds = time.perf_counter() - clock
                    save(epoch, done)
                if signum:
                    raise stop(signum, epoch, done)

            with EpochProgress(cfg.trainer.progress and main, epoch, cfg.trainer.epochs, steps,
                               first_step) as bar:
                train_epoch(forward, data.train, optimizer, scheduler, scaler, runtime, epoch, totals,
                            first_step, on_step)
            check_finite(epoch)
            seconds = time.perf_counter() - clock
            whole = totals.reduced()
            metrics = {"epoch": epoch, **whole.metrics(), **evaluate(forward, data.test, runtime),
                       "lr": scheduler.get_last_lr()[0], "seconds": seconds,
                       "images_per_s": whole.seen / seconds}
            tracker.epoch(metrics, global_step=epoch * steps)
            improved = metrics["test_acc"] > best_acc
            best_acc = max(best_acc, metrics["test_acc"])
            totals, first_step = None, 0
            save(epoch + 1, 0, best=improved)
            signum = distributed.largest(signals.signum or 0)
            if signum and epoch < cfg.trainer.epochs:
                raise stop(signum, epoch + 1, 0)
        if cfg.trainer.save_weights and main:
            # CPU tensors: the weights load anywhere, without a map_location.
            weights = {k: v.cpu() for k, v in model.state_dict().items()}
            checkpoint.write_file(run_dir / "model.pt", lambda f: torch.save(weights, f),
                                  after=f", then run again to write it from {checkpoint.LAST}")
            tracker.weights(run_dir / "model.pt")
        tracker.finish({"params": params, "total_seconds": time.perf_counter() - began})
    return metrics["test_acc"]


def spawned_rank(cfg: DictConfig, run_dir: Path, hydra_state: bytes) -> float:
    """One rank of device.world_size, in a fresh process: the job's Hydra state (its logging,
    the identity its W&B run takes) is set again first, as Hydra's submitit launcher does."""
    Singleton.set_state(pickle.loads(hydra_state))
    configure_log(HydraConfig.get().job_logging)
    return train(cfg, run_dir)


def hydra_record(cfg: DictConfig) -> dict:
    """The files of the job's record (hydra.output_subdir) as Hydra writes them (run_job)."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.output_subdir is None:
        return {}
    nodes = {"config.yaml": cfg, "hydra.yaml": HydraConfig.instance().cfg, "overrides.yaml": hydra_cfg.overrides.task}
    return {f"{hydra_cfg.output_subdir}/{name}": OmegaConf.to_yaml(node) for name, node in nodes.items()}


@hydra.main(version_base="1.3", config_path="pkg://resnet_lab.conf", config_name="config")
def run(cfg: DictConfig) -> float:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    HeldBack.single_run = HydraConfig.get().mode == RunMode.RUN
    ranks = distributed.from_env()
    # One run in the folder at a time (a submitit job's tasks make their process group here to
    # learn whether rank 0 holds it). Rank 0's alone: under torchrun the other ranks write no
    # Hydra record (resnet_lab/__main__.py).
    with distributed.process_group(ranks), runlock.held(run_dir, ranks.is_main, hydra_record(cfg)), \
            checkpoint.hydra_record_kept(run_dir) if ranks.is_main else contextlib.nullcontext():
        return launch(cfg, run_dir, ranks)


def launch(cfg: DictConfig, run_dir: Path, ranks: distributed.Ranks) -> float:
    """Train in this process, or start device.world_size ranks that do."""
    world_size = cfg.device.world_size
    if world_size > 1 and ranks.world_size > 1:
        raise UserError(f"device.world_size={world_size}: this process is already rank {ranks.rank} of "
                        f"{ranks.world_size} (torchrun or SLURM set the ranks); leave device.world_size at 1")
    if world_size > 1:
        validate(cfg)  # one message from here rather than one per rank
        # cloudpickle: Hydra's state holds resolvers that are local functions.
        hydra_state = cloudpickle.dumps(Singleton.get_state())
        return distributed.spawn(world_size, spawned_rank, cfg, run_dir, hydra_state)
    return train(cfg, run_dir)
