"""Wiring: the Hydra task that builds the parts named by the config and runs the epochs."""

import logging
import math
import random
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from resnet_lab import device as device_setup
from resnet_lab.config import register_configs, validate
from resnet_lab.data import build_data
from resnet_lab.engine import evaluate, train_epoch
from resnet_lab.errors import UserError
from resnet_lab.models import build_model
from resnet_lab.optim import build_optimizer, build_scheduler
from resnet_lab.tracking import EpochProgress, Tracker

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
    with Tracker(run_dir, cfg) as tracker:
        return fit(cfg, run_dir, tracker)


def fit(cfg: DictConfig, run_dir: Path, tracker: Tracker) -> float:
    began = time.perf_counter()
    runtime = device_setup.resolve(cfg.device)
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    data = build_data(cfg.dataset, cfg.trainer, runtime.device, cfg.seed, runtime.channels_last)
    model = runtime.prepare(build_model(cfg.model, data.in_channels, data.num_classes))
    forward = torch.compile(model, mode=runtime.compile_mode) if runtime.compile else model
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.sched, len(data.train), cfg.trainer.epochs)
    scaler = runtime.grad_scaler()

    params = sum(p.numel() for p in model.parameters())
    log.info(f"{cfg.model.name} ({params:,} parameters) on {cfg.dataset.name} "
             f"({data.train.num_samples} train, {data.test.num_samples} test images), "
             f"{runtime.device.type} {runtime.precision}"
             f"{' channels_last' if runtime.channels_last else ''}{' compiled' if runtime.compile else ''}; "
             f"writing to {run_dir}")
    metrics = {}
    for epoch in range(1, cfg.trainer.epochs + 1):
        start = time.perf_counter()
        with EpochProgress(cfg.trainer.progress, epoch, cfg.trainer.epochs, len(data.train)) as bar:
            def on_step(step, loss):
                bar.advance()
                tracker.step((epoch - 1) * len(data.train) + step + 1, loss)

            train_metrics = train_epoch(forward, data.train, optimizer, scheduler, scaler, runtime,
                                        epoch, on_step=on_step)
        seconds = time.perf_counter() - start
        images = train_metrics.pop("images")
        metrics = {"epoch": epoch, **train_metrics, **evaluate(forward, data.test, runtime),
                   "lr": scheduler.get_last_lr()[0], "seconds": seconds,
                   "images_per_s": images / seconds}
        tracker.epoch(metrics)
        if not math.isfinite(metrics["train_loss"]):
            # A failed job, not a NaN result: Optuna then marks the trial failed and goes on.
            raise UserError(f"training diverged: train loss {metrics['train_loss']} in epoch {epoch}; "
                            f"try a lower optim.lr (now {cfg.optim.lr})")
    if cfg.trainer.save_weights:
        torch.save(model.state_dict(), run_dir / "model.pt")
        tracker.weights(run_dir / "model.pt")
    tracker.finish({"params": params, "total_seconds": time.perf_counter() - began})
    return metrics["test_acc"]


@hydra.main(version_base="1.3", config_path="pkg://resnet_lab.conf", config_name="config")
def run(cfg: DictConfig) -> float:
    return train(cfg, Path(HydraConfig.get().runtime.output_dir))
