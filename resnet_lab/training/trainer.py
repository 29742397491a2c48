"""The trainer: the steps of a run as methods (set up, resume, one epoch, after a step, evaluate,
save, finish), the run's progress in one `State`, and the after-a-step policy as one pure function.

A run is `Trainer(cfg, run_dir, ranks, plan).run()`: set up the parts, resume when the plan says
so, then for each epoch train it (calling `after_step` after every step) and end it (evaluate,
save). Per-step features are `engine.Callback`s, passed to the loop beside the trainer itself.
"""

import contextlib
import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel

from resnet_lab import device as device_setup
from resnet_lab import distributed, rundir
from resnet_lab.config import chooses_best, objective, returned
from resnet_lab.data import build_data
from resnet_lab.errors import UserError
from resnet_lab.models import build_model, weights
from resnet_lab.optim import build_optimizer, build_scheduler, logged_rates
from resnet_lab.preemption import Stopped, StopSignals
from resnet_lab.training.trial import Pruned, TrialReport
from resnet_lab.training import checkpoint
from resnet_lab.training.confusion import Confusion
from resnet_lab.training.engine import Callback, RunningTotals, evaluate, train_epoch
from resnet_lab.training.features import build_features
from resnet_lab.training.resume import Plan, applied
from resnet_lab.training.tracking import EpochProgress, MetricsFile, Tracker

log = logging.getLogger("resnet_lab")
WHITEN_IMAGES = 5000  # the training images model.stem=whiten is set from: their 2x2 patches number millions


@dataclass
class State:
    """A run's progress: exactly what a checkpoint holds beside the parts' own states (model,
    optimizer, schedule, grad scaler), the random states and the config."""

    epoch: int = 1  # the epoch training now or next, from 1
    step: int = 0  # the batches of that epoch done: its next batch (at an update's end)
    # The epoch's running totals so far: live on the device while training; in a checkpoint,
    # summed over the ranks (None at an epoch's start).
    totals: Optional[RunningTotals] = None
    best_acc: float = -1.0  # of the objective, at the best epoch (when config.chooses_best)
    best_epoch: Optional[int] = None  # that epoch, whose weights best.pt holds
    metrics: Dict[str, float] = field(default_factory=dict)  # the last epoch's row
    elapsed: float = 0.0  # the run's wall seconds, over all its resumed parts, at its last save
    wandb_run_id: Optional[str] = None

    FIELDS = ("epoch", "step", "totals", "best_acc", "best_epoch", "metrics", "elapsed", "wandb_run_id")


@dataclass(frozen=True)
class Decision:
    check_loss: bool = False  # read whether the loss became NaN or inf (waits for the device)
    save: bool = False  # write checkpoints/last.pt now
    stop: int = 0  # the signal to stop for, after saving; 0: train on


def updates(batches: int, accumulate: int) -> int:
    """The updates made over `batches` batches of an epoch, one each `accumulate` and one for the rest."""
    return math.ceil(batches / accumulate)


def after_step(state: State, steps: int, every: int, signum: int, check_every_step: bool,
               accumulate: int = 1) -> Decision:
    """What to do once an update has left the run at `state`, in an epoch of `steps` batches,
    `accumulate` to an update: write a mid-epoch checkpoint every `every` updates of the run
    (0: never; the epoch's end writes its own), stop at a signal (`signum`, 0 for none) after
    writing one, and look at the loss before every checkpoint (a diverged run must not
    overwrite its last good one), or after every update when reading it costs nothing
    (`check_every_step`)."""
    run_step = (state.epoch - 1) * updates(steps, accumulate) + updates(state.step, accumulate)
    due = every > 0 and run_step % every == 0 and state.step < steps
    return Decision(check_loss=check_every_step or due or bool(signum), save=due or bool(signum), stop=signum)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace to repeat itself; read when cuBLAS makes its first one.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def build(cfg: DictConfig, runtime: device_setup.Runtime, ranks: distributed.Ranks, fresh: bool = True):
    """The parts of a run, for this rank: its data, the bare model (the optimizer and checkpoints
    hold it, so a DDP checkpoint resumes in one process), the model that trains (under DDP and
    compiled, as asked), the optimizer, the schedule and the grad scaler. A `fresh` run starts
    from model.init's weights, if set (a resumed one from its checkpoint's)."""
    data = build_data(cfg.dataset, cfg.trainer, runtime.device, cfg.seed, ranks.rank, ranks.world_size)
    model = build_model(cfg.model, data.in_channels, data.num_classes)
    if fresh and cfg.model.init:
        weights.init(model, Path(cfg.model.init))
    elif fresh and cfg.model.get("stem") == "whiten":
        # Each rank from its own images; DDP then starts every rank from rank 0's weights.
        model.whiten_from(data.train.sample(WHITEN_IMAGES))
    # The network decides whether channels_last is safe, so the batches' layout follows it.
    model = runtime.prepare(model)
    data.normalizer.memory_format = runtime.memory_format
    if cfg.device.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    parallel = model
    if ranks.world_size > 1:
        parallel = DistributedDataParallel(model, device_ids=[ranks.local_rank] if runtime.device.type == "cuda"
                                           else None)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.sched, updates(len(data.train), cfg.trainer.accumulate),
                                cfg.trainer.epochs)
    return data, model, runtime.compiled(parallel), optimizer, scheduler, runtime.grad_scaler()


class Trainer(Callback):
    """One run of cfg in run_dir, on this rank (rank 0 alone writes and reports)."""

    def __init__(self, cfg: DictConfig, run_dir: Path, ranks: distributed.Ranks, plan: Plan,
                 identity: Tuple[Optional[str], str]):
        """identity: the W&B (group, name) of the run."""
        self.cfg, self.run_dir, self.ranks, self.plan = cfg, Path(run_dir), ranks, plan
        self.identity = identity
        self.main = ranks.is_main
        self.state = State()
        self.began = time.perf_counter()  # minus the seconds of the parts before a resume
        self.last_good: Optional[str] = None  # the last checkpoint written, for the NaN message
        self.confusion: Optional[Confusion] = None  # of the last evaluation, for the run's final report
        self.objective, self.chooses = objective(cfg), chooses_best(cfg)

    def run(self) -> float:
        """Set up, resume, train the remaining epochs; the objective at the epoch the run is judged by."""
        self.setup()
        if self.plan.action == "continue":
            self.resume()
        if self.main:
            rundir.remove_leftovers(self.run_dir)
            checkpoint.keep_epochs(self.run_dir / rundir.METRICS, self.state.epoch - 1)
        # As a search's trial, rank 0 reports each epoch to the study.
        self.trial = TrialReport(self.cfg.get("search") if self.main else None, self.objective,
                                 MetricsFile(self.run_dir).read() if self.main else [])
        self.announce()
        # The tracker opens only now, when the run is sure to train: a run that fails while setting
        # up (a resume into another model, say) leaves the folder's status and its W&B run as they
        # were. A run resumed in its own folder continues its W&B run rather than starting a second
        # one; a new folder started from another run's checkpoint gets a W&B run of its own. The
        # tracker closes before the signals are handed back (to submitit's requeue, under SLURM).
        own_run_id = self.state.wandb_run_id if self.plan.own else None
        with contextlib.closing(self.data), StopSignals() as self.signals, \
                Tracker(self.run_dir, self.cfg, resume_id=own_run_id, rank=self.ranks.rank,
                        identity=self.identity, runtime=self.runtime_record(),
                        epoch_updates=self.updates) as self.tracker:
            for _ in range(self.state.epoch, self.cfg.trainer.epochs + 1):
                self.train_epoch()
                self.end_epoch()
            self.finish()
        return returned(self.cfg, self.state.best_acc, self.state.metrics)

    def setup(self) -> None:
        """The device, the seeds, the parts, and how often the loss is looked at."""
        self.runtime = device_setup.resolve(self.cfg.device, self.ranks)
        # Its own seed per rank for dropout's masks; the weights start as rank 0's (DDP copies them)
        # and the batches are a function of cfg.seed alone.
        seed_everything(self.cfg.seed + self.ranks.rank, self.cfg.trainer.deterministic)
        (self.data, self.model, self.forward, self.optimizer, self.scheduler,
         self.scaler) = build(self.cfg, self.runtime, self.ranks, fresh=self.plan.action == "fresh")
        self.checkpoints = checkpoint.Checkpointer(self.run_dir, self.cfg, self.model, self.optimizer,
                                                   self.scheduler, self.scaler, self.runtime.device,
                                                   best_of_ema=self.objective.endswith("_ema"))
        self.steps = len(self.data.train)
        self.updates = updates(self.steps, self.cfg.trainer.accumulate)
        # The order of engine.Callback: the features, then the trainer (which checkpoints them).
        self.features = build_features(self.cfg, self.model, self.runtime.device, self.evaluations)
        self.callbacks = [*self.features, self]
        # Reading a CPU tensor costs nothing, so on the CPU a diverged loss stops the very step it
        # appears; on an accelerator it is read only where the host waits anyway (checkpoints).
        self.check_every_step = self.runtime.device.type == "cpu"

    def resume(self) -> None:
        """The parts' states and the progress from the plan's checkpoint."""
        saved, path = self.plan.state, self.plan.checkpoint
        self.checkpoints.restore(saved, path, self.ranks.rank)
        self.state = State(**{k: saved[k] for k in State.FIELDS if k in saved and k != "totals"})
        for feature in self.features:
            if feature.name in saved.get("features", {}):
                feature.load_state_dict(saved["features"][feature.name])
            else:
                log.warning(f"{path} holds no {feature.name} state (its run had it off): it starts afresh here")
        self.began -= self.state.elapsed  # total_seconds counts the parts before the stop
        if saved["totals"] is not None:
            # The saved sums are over all ranks: rank 0 carries them on, the others add to nothing.
            totals = saved["totals"] if self.main else {"seconds": saved["totals"]["seconds"]}
            self.state.totals = RunningTotals.from_state_dict(totals, self.runtime.device)
        self.last_good = f"{path} (epoch {self.state.epoch} step {self.state.step})"
        log.info(f"resuming from {path} at epoch {self.state.epoch} step {self.state.step}")
        if self.plan.own and self.main:
            # A kill between last.pt and the files linked after it (ema.pt, best.pt) left those a
            # checkpoint behind: they are made again from what last.pt holds.
            self.checkpoints.repair(saved, best=self.state.best_epoch == self.state.epoch - 1 and not self.state.step)
        if self.plan.changes:
            log.warning(f"settings differ from the checkpoint's: {'; '.join(self.plan.changes)}")
        if applied(self.plan.changes):
            log.info(f"optimizer settings applied from epoch {self.state.epoch} step {self.state.step} on, the "
                     f"schedule rescaled to them: {'; '.join(applied(self.plan.changes))}")

    def announce(self) -> None:
        cfg, runtime, world = self.cfg, self.runtime, self.ranks.world_size
        self.params = sum(p.numel() for p in self.model.parameters())
        val = f", {self.data.val.num_samples} validation" if self.data.val else ""
        log.info(f"{cfg.model.name} ({self.params:,} parameters) on {cfg.dataset.name} "
                 f"({self.data.train.num_samples} train{val}, {self.data.test.num_samples} test images), "
                 f"{runtime.device.type} {runtime.precision}"
                 f"{' channels_last' if runtime.channels_last else ''}{' compiled' if runtime.compile else ''}"
                 f"{f', {world} ranks' if world > 1 else ''}; writing to {self.run_dir}")
        if self.chooses and not self.objective.startswith("val"):
            log.warning(f"trainer.objective={self.objective}: the best epoch (best.pt, the value returned, "
                        f"every 'best') is chosen on the test split, so its test accuracy is an optimistic "
                        f"estimate; hold out a validation split (dataset.val_fraction) to choose on it")

    def runtime_record(self) -> Dict:
        """What this run trains on and with, settled (runs from two machines told apart): the
        device settings as resolved here, the ranks, the batch per rank and per update, the splits'
        sizes, the versions and instruction sets."""
        trainer, world = self.cfg.trainer, self.ranks.world_size
        return {**device_setup.resolved(self.runtime), "world_size": world,
                "batch_per_rank": trainer.batch_size // world, "global_batch": trainer.batch_size,
                "images_per_update": trainer.batch_size * trainer.accumulate,
                "train_images": self.data.train.num_samples,
                "val_images": self.data.val.num_samples if self.data.val else 0,
                "test_images": self.data.test.num_samples}

    def train_epoch(self) -> None:
        """Train state.epoch from state.step to its end."""
        state = self.state
        state.totals = state.totals or RunningTotals(self.runtime.device)
        # A resumed epoch counts its time before the stop.
        self.clock = time.perf_counter() - state.totals.seconds
        show = self.cfg.trainer.progress and self.main
        with EpochProgress(show, state.epoch, self.cfg.trainer.epochs, self.steps, state.step) as self.bar:
            train_epoch(self.forward, self.data.train, self.optimizer, self.scheduler, self.scaler,
                        self.runtime, state.epoch, state.totals, state.step, self.callbacks,
                        accumulate=self.cfg.trainer.accumulate, label_smoothing=self.cfg.loss.label_smoothing)

    def global_step(self) -> int:
        """The updates of the run so far."""
        return (self.state.epoch - 1) * self.updates + updates(self.state.step, self.cfg.trainer.accumulate)

    def after_step(self, step: int, loss: torch.Tensor) -> None:
        """engine.Callback: report the update, then do what the policy decides."""
        state = self.state
        self.bar.advance(step + 1 - state.step)
        state.step = step + 1
        logged = {key: value for feature in self.features for key, value in feature.logged().items()}
        self.tracker.step(self.global_step(), loss, logged)
        signum = distributed.largest(self.signals.signum or 0)  # all ranks stop at the same step
        decision = after_step(state, self.steps, self.cfg.trainer.checkpoint_every_steps, signum,
                              self.check_every_step, self.cfg.trainer.accumulate)
        if decision.check_loss:
            self.check_finite()
        if decision.save:
            state.totals.seconds = time.perf_counter() - self.clock
            self.save()
        if decision.stop:
            raise self.stop(decision.stop)

    def end_epoch(self) -> None:
        """Evaluate the epoch, report it, and save the start of the next (best.pt too if the run
        chooses a best epoch and this is it); a signal during the evaluation stops the run there."""
        state = self.state
        self.check_finite()
        metrics = self.evaluate()
        self.tracker.epoch(metrics, global_step=state.epoch * self.updates)
        improved = self.chooses and metrics[self.objective] > state.best_acc
        if improved:
            state.best_acc, state.best_epoch = metrics[self.objective], state.epoch
        state.metrics, state.epoch, state.step, state.totals = metrics, state.epoch + 1, 0, None
        self.save(best=improved)
        signum = distributed.largest(self.signals.signum or 0)
        if signum and state.epoch <= self.cfg.trainer.epochs:
            raise self.stop(signum)
        prune = self.main and self.trial.should_prune(state.epoch - 1, metrics[self.objective])
        if distributed.largest(int(prune)) and state.epoch <= self.cfg.trainer.epochs:
            log.info(f"trial {self.cfg.search.trial}: pruned at epoch {state.epoch - 1} (the pruner's call); "
                     f"{self.checkpoints.folder / rundir.LAST} and its metrics kept")
            raise Pruned(self.cfg.search.trial, state.epoch - 1)

    def evaluate(self) -> Dict[str, float]:
        """The epoch's row: its training totals, the validation and test metrics, the features'
        (an EMA's metrics, say), the learning rates and momentum (optim.logged_rates) and speed."""
        seconds = time.perf_counter() - self.clock
        whole = self.state.totals.reduced()
        # Each rank's batch-norm statistics moved with its own last batches: every rank evaluates
        # with rank 0's, so the metrics are those of the model rank 0 saves (timm's --dist-bn).
        distributed.broadcast_buffers(self.model)
        self.confusion = Confusion(self.data.num_classes, self.runtime.device)
        features = {key: value for feature in self.features for key, value in feature.end_epoch().items()}
        return {"epoch": self.state.epoch, **whole.metrics(), **self.evaluations(self.forward, self.confusion.add),
                **features, **logged_rates(self.optimizer, self.cfg.optim.backbone_lr_scale != 1),
                "seconds": seconds, "images_per_s": whole.seen / seconds}

    def evaluations(self, model: torch.nn.Module, keep=None) -> Dict[str, float]:
        """The loss and accuracy of `model` on the validation split (if any) and the test split;
        `keep` sees the test split's batches (engine.evaluate)."""
        splits = {"val": self.data.val, "test": self.data.test}
        return {key: value for split, loader in splits.items() if loader is not None
                for key, value in evaluate(model, loader, self.runtime, split, self.cfg.trainer.tta,
                                           keep if split == "test" else None, self.cfg.trainer.tta_shift).items()}

    def check_finite(self) -> None:
        bad = self.state.totals.bad_step()
        if bad is not None:
            kept = f"the last good checkpoint is {self.last_good}" if self.last_good else "no checkpoint was written"
            raise UserError(f"the training loss became NaN or inf at epoch {self.state.epoch} step "
                            f"{bad + 1}/{self.steps}; training stopped and {kept}; lower optim.lr "
                            f"(now {self.cfg.optim.lr})")

    def save(self, best: bool = False) -> None:
        """Write the state into last.pt (and best.pt), on rank 0, with every rank's random state."""
        state = self.state
        state.elapsed = time.perf_counter() - self.began
        state.wandb_run_id = self.tracker.run_id
        whole = state.totals and state.totals.reduced()
        rngs = distributed.gather(checkpoint.rng_states(self.runtime.device))
        # No rank runs ahead of a checkpoint (a job killed later resumes from this one), and
        # every rank learns whether rank 0 could write it (a full disk, say).
        with distributed.rank_0_failure_stops_all():
            if self.main:
                progress = {k: getattr(state, k) for k in State.FIELDS}
                features = {feature.name: feature.state_dict() for feature in self.features}
                self.checkpoints.save(**{**progress, "totals": whole and whole.state_dict()}, rngs=rngs,
                                      features=features, best=best, classes=self.data.classes)
        self.last_good = f"{self.checkpoints.folder / rundir.LAST} (epoch {state.epoch} step {state.step})"

    def stop(self, signum: int) -> Stopped:
        log.warning(f"{signal.Signals(signum).name}: stopped at epoch {self.state.epoch} step "
                    f"{self.state.step}/{self.steps}; {self.checkpoints.folder / rundir.LAST} written: "
                    f"run the same command to resume")
        return Stopped(signum)

    def finish(self) -> None:
        """The final weights (model.pt), the last evaluation's confusion matrix (eval/final.*),
        and the run's summary and status."""
        if self.confusion is None and not (self.run_dir / rundir.EVAL / rundir.FINAL).is_file():
            # A resumed run with no epoch left, whose last one ended before its report was written
            # (a kill, a full disk): the last checkpoint's weights evaluated again give it.
            self.confusion = Confusion(self.data.num_classes, self.runtime.device)
            self.evaluations(self.forward, self.confusion.add)
        if self.confusion is not None:  # None when the report was written by the part that trained last
            matrix = self.confusion.matrix()
            if self.main:
                self.tracker.final_report(matrix, self.data.classes)
        if self.cfg.trainer.save_weights and self.main:
            # The final weights are those of the last checkpoint (every epoch's end writes one).
            self.checkpoints.publish(self.run_dir / rundir.MODEL,
                                     after=f", then run again to write it from {rundir.LAST}")
            self.tracker.weights(self.run_dir / rundir.MODEL)
        if self.main:
            self.checkpoints.drop_previous()
        self.tracker.finish({"params": self.params, "total_seconds": time.perf_counter() - self.began})
