"""Wiring: the Hydra task that builds the parts named by the config and runs the epochs."""

import logging
import random
import signal
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from resnet_lab import checkpoint
from resnet_lab import device as device_setup
from resnet_lab.config import register_configs, validate
from resnet_lab.data import build_data
from resnet_lab.engine import RunningTotals, evaluate, train_epoch
from resnet_lab.errors import UserError
from resnet_lab.models import build_model
from resnet_lab.optim import build_optimizer, build_scheduler
from resnet_lab.preemption import StopSignals, Stopped
from resnet_lab.tracking import METRICS_FILE, EpochProgress, Tracker

log = logging.getLogger("resnet_lab")

register_configs()


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def train(cfg: DictConfig, run_dir: Path) -> float:
    """Train as cfg says, writing into run_dir; returns the final test accuracy."""
    validate(cfg)
    began = time.perf_counter()
    resume_from = checkpoint.to_resume(cfg.trainer.resume, run_dir)
    state = checkpoint.load(resume_from) if resume_from else None
    runtime = device_setup.resolve(cfg.device)
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    data = build_data(cfg.dataset, cfg.trainer, runtime.device, cfg.seed, runtime.channels_last)
    model = runtime.prepare(build_model(cfg.model, data.in_channels, data.num_classes))
    forward = torch.compile(model, mode=runtime.compile_mode) if runtime.compile else model
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.sched, len(data.train), cfg.trainer.epochs)
    scaler = runtime.grad_scaler()
    checkpoints = checkpoint.Checkpointer(run_dir, cfg, model, optimizer, scheduler, scaler, runtime.device)
    first_epoch, first_step, totals, best_acc, metrics = 1, 0, None, -1.0, {}
    if state is not None:
        checkpoints.restore(state, resume_from)
        first_epoch, first_step = state["epoch"], state["step"]
        best_acc, metrics = state["best_acc"], state["metrics"]
        if state["totals"] is not None:
            totals = RunningTotals.from_state_dict(state["totals"], runtime.device)
        changes = checkpoint.config_changes(state["config"], cfg)
        log.info(f"{resume_from}: the run has finished" if first_epoch > cfg.trainer.epochs
                 else f"resuming from {resume_from} at epoch {first_epoch} step {first_step}")
        if changes:
            log.warning(f"settings differ from the checkpoint's: {'; '.join(changes)}")
    checkpoint.keep_epochs(run_dir / METRICS_FILE, first_epoch - 1)

    params = sum(p.numel() for p in model.parameters())
    log.info(f"{cfg.model.name} ({params:,} parameters) on {cfg.dataset.name} "
             f"({data.train.num_samples} train, {data.test.num_samples} test images), "
             f"{runtime.device.type} {runtime.precision}"
             f"{' channels_last' if runtime.channels_last else ''}{' compiled' if runtime.compile else ''}; "
             f"writing to {run_dir}")
    steps, every = len(data.train), cfg.trainer.checkpoint_every_steps
    last_good = f"{resume_from} (epoch {first_epoch} step {first_step})" if state is not None else None
    # Reading a CPU tensor costs nothing, so on the CPU a diverged loss stops the very step it
    # appears; on an accelerator it is read only where the host waits anyway (checkpoints).
    check_every_step = runtime.device.type == "cpu"

    def save(epoch: int, step: int, best: bool = False) -> None:
        nonlocal last_good
        checkpoints.save(epoch, step, totals=totals and totals.state_dict(), best_acc=best_acc,
                         metrics=metrics, wandb_run_id=getattr(tracker, "run_id", None), best=best)
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
    # were. A resumed run continues its W&B run rather than starting a second one.
    with Tracker(run_dir, cfg, resume_id=state and state["wandb_run_id"]) as tracker, \
            StopSignals() as signals:
        for epoch in range(first_epoch, cfg.trainer.epochs + 1):
            totals = totals or RunningTotals(runtime.device)
            clock = time.perf_counter() - totals.seconds  # a resumed epoch counts its time before the stop

            def on_step(step: int, loss: torch.Tensor) -> None:
                bar.advance()
                tracker.step((epoch - 1) * steps + step + 1, loss)
                done = step + 1
                due = every > 0 and ((epoch - 1) * steps + done) % every == 0 and done < steps
                if check_every_step or due or signals.signum:
                    check_finite(epoch)
                if due or signals.signum:
                    totals.seconds = time.perf_counter() - clock
                    save(epoch, done)
                if signals.signum:
                    raise stop(signals.signum, epoch, done)

            with EpochProgress(cfg.trainer.progress, epoch, cfg.trainer.epochs, steps, first_step) as bar:
                train_epoch(forward, data.train, optimizer, scheduler, scaler, runtime, epoch, totals,
                            first_step, on_step)
            check_finite(epoch)
            seconds = time.perf_counter() - clock
            metrics = {"epoch": epoch, **totals.metrics(), **evaluate(forward, data.test, runtime),
                       "lr": scheduler.get_last_lr()[0], "seconds": seconds,
                       "images_per_s": totals.seen / seconds}
            tracker.epoch(metrics)
            improved = metrics["test_acc"] > best_acc
            best_acc = max(best_acc, metrics["test_acc"])
            totals, first_step = None, 0
            save(epoch + 1, 0, best=improved)
            if signals.signum and epoch < cfg.trainer.epochs:
                raise stop(signals.signum, epoch + 1, 0)
        if cfg.trainer.save_weights:
            torch.save(model.state_dict(), run_dir / "model.pt")
            tracker.weights(run_dir / "model.pt")
        tracker.finish({"params": params, "total_seconds": time.perf_counter() - began})
    return metrics["test_acc"]


@hydra.main(version_base="1.3", config_path="pkg://resnet_lab.conf", config_name="config")
def run(cfg: DictConfig) -> float:
    return train(cfg, Path(HydraConfig.get().runtime.output_dir))
