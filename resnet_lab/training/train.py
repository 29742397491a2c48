"""Wiring: the Hydra task, which plans the run (resnet_lab.training.resume) and hands it to the trainer
(resnet_lab.training.trainer) in this process or in device.world_size spawned ranks."""

import contextlib
import logging
import pickle
import sys
from pathlib import Path
from typing import Optional, Tuple

import cloudpickle
import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import configure_log
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from resnet_lab import distributed, rundir, sharing
from resnet_lab.config import register_configs, returned, validate
from resnet_lab.errors import HeldBack, UserError, reason
from resnet_lab.training import resume
from resnet_lab.training.resume import meaningful
from resnet_lab.training.trainer import Trainer

log = logging.getLogger("resnet_lab")

register_configs()


def job_identity(run_dir: Path, study: Optional[str] = None) -> Tuple[Optional[str], str]:
    """(W&B group, W&B name): the sweep folder (a search's study, for its trials) and the job's
    overrides, when Hydra runs this job."""
    run_dir = Path(run_dir).resolve()
    if HydraConfig.initialized():
        hydra = HydraConfig.get()
        # Only Hydra's current job may take its identity: train() can be called with any folder.
        if Path(hydra.runtime.output_dir).resolve() == run_dir:
            group = (study or rundir.sweep_group(Path(hydra.sweep.dir))) if hydra.mode == RunMode.MULTIRUN else None
            # Sorted, as in Hydra's override_dirname.
            return group, ",".join(sorted(meaningful(hydra.overrides.task))) or run_dir.name
    return None, run_dir.name


def train(cfg: DictConfig, run_dir: Path) -> float:
    """Train as cfg says, writing into run_dir; returns its objective at the epoch it is judged by
    (config.returned: the best validation accuracy when a split is held out, else the last test
    accuracy).

    As one of several ranks (torchrun, a SLURM task, device.world_size) it trains its part of
    every batch under DDP, and only rank 0 writes and reports.
    """
    ranks = distributed.from_env()
    validate(cfg, ranks.world_size)
    with distributed.process_group(ranks):
        if not ranks.is_main:
            log.setLevel(logging.ERROR)  # rank 0 speaks for all
        plan = resume.plan(Path(run_dir), cfg)
        if plan.action == "finished":
            return returned(cfg, plan.state["best_acc"], plan.state["metrics"])
        return Trainer(cfg, Path(run_dir), ranks, plan, job_identity(run_dir, cfg.search.study)).run()


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
    sweep_dir = None if HydraConfig.get().mode == RunMode.RUN else Path(HydraConfig.get().sweep.dir)
    if isinstance(sys.stderr, HeldBack):  # python -m resnet_lab's, which tells a single run's error from a sweep's
        sys.stderr.job(sweep_dir is None, sweep_dir)
    ranks = distributed.from_env()
    # One run in the folder at a time (a submitit job's tasks make their process group here to
    # learn whether rank 0 holds it). Rank 0's alone: under torchrun the other ranks write no
    # Hydra record (resnet_lab/__main__.py).
    with distributed.process_group(ranks), rundir.held(run_dir, ranks.is_main, hydra_record(cfg)), \
            rundir.hydra_record_kept(run_dir, sweep_dir) if ranks.is_main else contextlib.nullcontext(), \
            sharing.machine_share(cfg.device.type, max(ranks.world_size, cfg.device.world_size)):
        try:
            return launch(cfg, run_dir, ranks)
        except Exception as e:
            to_log_file(f"error: {reason(e)}")
            raise


def to_log_file(line: str) -> None:
    """A line for the run's train.log alone (Hydra's file handlers): python -m resnet_lab prints
    the same `error: ...` on the console once the job has ended."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def launch(cfg: DictConfig, run_dir: Path, ranks: distributed.Ranks) -> float:
    """Train in this process, or start device.world_size ranks that do."""
    world_size = cfg.device.world_size
    if world_size > 1 and ranks.world_size > 1:
        raise UserError(f"device.world_size={world_size}: this process is already rank {ranks.rank} of "
                        f"{ranks.world_size} (torchrun or SLURM set the ranks); leave device.world_size at 1")
    if world_size > 1:
        validate(cfg, world_size)  # one message from here rather than one per rank
        # cloudpickle: Hydra's state holds resolvers that are local functions. Relies on: Hydra's
        # Singleton state, set again in a fresh process, restores the job (tests/test_hydra_contract.py).
        hydra_state = cloudpickle.dumps(Singleton.get_state())
        return distributed.spawn(world_size, spawned_rank, cfg, run_dir, hydra_state)
    return train(cfg, run_dir)
