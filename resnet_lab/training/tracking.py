"""Where a run's metrics go: the console (a line per epoch, a progress bar), metrics.jsonl, the
run's status file, and Weights & Biases (one W&B run per Hydra job, its files in the run folder)."""

import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

from resnet_lab import distributed, rundir
from resnet_lab.config import chooses_best, chosen_epoch, objective
from resnet_lab.errors import UserError, reason
from resnet_lab.preemption import Stopped
from resnet_lab.progress import ProgressBar
from resnet_lab.rundir import write_file, write_status
from resnet_lab.training.trial import Pruned
from resnet_lab.training import confusion, wandb_records

log = logging.getLogger("resnet_lab")

ACCURACIES = ("val_acc", "test_acc", "val_acc_ema", "test_acc_ema")  # in an epoch's row, when measured
SPLITS = ("train", "val", "test", "lr")


def wandb_key(key: str) -> str:
    """An epoch row's key as W&B's panels group it: train_loss as train/loss, test_acc_ema as
    test/acc_ema, lr_head as lr/head; the others (epoch, seconds, grad_norm) as they are."""
    split, _, rest = key.partition("_")
    return f"{split}/{rest}" if split in SPLITS and rest else key


def format_epoch(m: Dict[str, float], epochs: int) -> str:
    shown = "".join(f"  {key.replace('_', ' ')} {m[key]:.4f}" for key in ACCURACIES if key in m)
    return (f"epoch {m['epoch']}/{epochs}  train loss {m['train_loss']:.4f}  "
            f"train acc {m['train_acc']:.4f}{shown}  "
            f"{m['seconds']:.1f} s  {m['images_per_s']:.0f} img/s")


class EpochProgress(ProgressBar):
    """The bar over one epoch's steps."""

    def __init__(self, enabled: bool, epoch: int, epochs: int, total: int, start: int = 0):
        super().__init__(enabled, f"epoch {epoch}/{epochs}", total, start)


class MetricsFile:
    """One JSON object per epoch, added as soon as the epoch ends: the file is written anew, so
    that a kill or a full disk leaves it with the row or without it, never with part of it."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / rundir.METRICS
        self.torn: List[int] = []  # the line numbers of rows read() left out

    def write(self, metrics: Dict[str, float]) -> None:
        rows = self.path.read_bytes() if self.path.exists() else b""
        write_file(self.path, lambda f: f.write(rows + (json.dumps(metrics) + "\n").encode()))

    def read(self) -> List[Dict[str, float]]:
        """The rows, less those that do not parse: write() never tears one, but a copy of the file
        taken while it was written, or a disk that lost its end, can leave part of one."""
        self.torn = []
        if not self.path.exists():
            return []
        rows = []
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                self.torn.append(number)
        return rows


_announced_mode = False


def choose_mode(mode: str) -> str:
    """logger.mode=auto: WANDB_MODE when set, else online with an API key, else offline."""
    global _announced_mode
    if mode != "auto":
        return mode
    import wandb

    if os.environ.get("WANDB_MODE"):
        chosen, why = os.environ["WANDB_MODE"], "WANDB_MODE is set"
    elif wandb.login(prompt=False, verify=False):
        chosen, why = "online", "a W&B API key is configured"
    else:
        chosen, why = "offline", "no W&B API key is configured (`wandb login` to go online)"
    if not _announced_mode:
        log.info(f"W&B logging {chosen}: {why}; logger.mode=online/offline/disabled to choose")
        _announced_mode = True
    return chosen


class Tracker:
    """Fans a run's metrics out to the console, metrics.jsonl and W&B, and records how it ended.

    Use it as a context manager: a run that raises is finished as failed (W&B exit code 1), so
    the next job of a sweep in the same process starts a clean W&B run. On DDP ranks other than
    0 it writes nothing; they only learn whether rank 0 could open it, and stop with its error if not.
    """

    def __init__(self, run_dir: Path, cfg: DictConfig, resume_id: Optional[str] = None, rank: int = 0,
                 identity: Optional[Tuple[Optional[str], str]] = None, runtime: Optional[Dict] = None,
                 epoch_updates: int = 0):
        """identity: the W&B run's (group, name); default: no group, the run folder's name.
        runtime: the resolved runtime, written to runtime.json and the W&B config's `runtime`.
        epoch_updates: the updates of an epoch, whose multiples are the steps its rows end at."""
        self.run_dir = Path(run_dir)
        self.identity = identity or (None, self.run_dir.name)
        self.epochs = cfg.trainer.epochs
        self.objective, self.chooses = objective(cfg), chooses_best(cfg)
        self.log_every = cfg.logger.log_every_steps
        self.log_weights = cfg.logger.log_weights
        self.main = rank == 0
        self.metrics = MetricsFile(self.run_dir)
        self.global_step = 0
        self.finished = False
        self.wandb = None
        # Every rank learns here whether rank 0 opened W&B (logger.mode=online without an API
        # key cannot): the others would otherwise train on and wait for it at their first collective.
        with distributed.rank_0_failure_stops_all():
            if self.main:
                if runtime is not None:
                    write_file(self.run_dir / rundir.RUNTIME, lambda f: f.write(json.dumps(runtime, indent=1).encode()))
                if cfg.logger.name == "wandb":
                    self.wandb = self._open_wandb(cfg, resume_id, runtime)
                    if resume_id and self.wandb is not None and self.wandb.offline:
                        self._log_lost_rows(epoch_updates)
                write_status(self.run_dir, "running")

    def _open_wandb(self, cfg: DictConfig, resume_id: Optional[str], runtime: Optional[Dict]):
        mode = choose_mode(cfg.logger.mode)
        if mode == "disabled":
            return None
        import wandb

        group, name = self.identity
        try:
            run = wandb.init(dir=self.run_dir, mode=mode, project=cfg.logger.project,
                             entity=cfg.logger.entity, tags=list(cfg.logger.tags), group=group, name=name,
                             job_type="train", config={**OmegaConf.to_container(cfg, resolve=True),
                                                       **({"runtime": runtime} if runtime else {})},
                             id=resume_id, resume="allow" if resume_id else None)
        except wandb.errors.Error as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"logger.mode={cfg.logger.mode}: W&B could not start a run: {first} "
                            f"(logger.mode=offline logs without an account)") from e
        # Every row carries the global step as its x axis, so a resumed run never logs "backwards".
        run.define_metric("global_step")
        run.define_metric("*", step_metric="global_step")
        return run

    def _parts(self) -> List[Path]:
        """The folders of this W&B run's parts in the run folder, one per start (offline-run-... or
        run-...), by start time."""
        return sorted(Path(self.wandb.sync_dir).parent.glob(f"*run-*-{self.wandb.id}"),
                      key=lambda folder: folder.name.removeprefix("offline-"))

    def _log_lost_rows(self, epoch_updates: int) -> None:
        """Offline, a part killed outright loses the records W&B's service had not yet written to
        its folder (often all of them): the rows of metrics.jsonl that no earlier part's records
        hold are logged again here, at the steps they ended at, so that `wandb sync` of every part
        uploads each epoch once. Online, what reached W&B's server is not known here: nothing is
        logged again."""
        earlier = [folder for folder in self._parts() if folder != Path(self.wandb.sync_dir)]
        held = {epoch for folder in earlier
                for epoch in wandb_records.logged_epochs(folder / f"run-{self.wandb.id}.wandb")}
        lost = [row for row in self.metrics.read() if row["epoch"] not in held]
        for row in lost:
            self._log_row(row, row["epoch"] * epoch_updates)
        if lost:
            epochs = ", ".join(str(row["epoch"]) for row in lost)
            log.info(f"W&B: no earlier part's offline records hold epoch {epochs} (a part killed before W&B "
                     f"wrote them); logged again from {rundir.METRICS}")

    def _log_row(self, metrics: Dict[str, float], global_step: int) -> None:
        self.wandb.log({"global_step": global_step, **{wandb_key(k): v for k, v in metrics.items()}})

    @property
    def run_id(self) -> Optional[str]:
        return self.wandb.id if self.wandb is not None else None

    def step(self, global_step: int, loss, logged: Optional[Dict] = None) -> None:
        """Called every update; reads the loss, and the device values in `logged` (a gradient
        norm, say), off the device only every log_every updates."""
        self.global_step = global_step
        if self.wandb is not None and global_step % self.log_every == 0:
            values = {key: value.item() for key, value in {"train/loss_step": loss, **(logged or {})}.items()}
            self.wandb.log({"global_step": global_step, **values})

    def epoch(self, metrics: Dict[str, float], global_step: Optional[int] = None) -> None:
        """One epoch's row; global_step, when given, is the step it ends at (a resumed epoch
        whose steps all ran before the stop calls step() no more)."""
        if global_step is not None:
            self.global_step = global_step
        if not self.main:
            return
        log.info(format_epoch(metrics, self.epochs))
        self.metrics.write(metrics)
        if self.wandb is not None:
            self._log_row(metrics, self.global_step)

    def final_report(self, matrix: List[List[int]], classes: List[str]) -> None:
        """The last evaluation's confusion matrix and per-class metrics: eval/final.json and
        eval/final_confusion.csv, and W&B's charts of them."""
        report = confusion.report(matrix, classes)
        folder = self.run_dir / rundir.EVAL
        write_file(folder / rundir.FINAL, lambda f: f.write(confusion.json_bytes(report)))
        write_file(folder / "final_confusion.csv", lambda f: f.write(confusion.csv_text(matrix, classes).encode()))
        if self.wandb is not None:
            self.wandb.log({"global_step": self.global_step, **confusion.wandb_charts(matrix, classes, "final")})

    def weights(self, path: Path) -> None:
        """The final weights, kept as a W&B artifact when logger.log_weights is on."""
        if self.wandb is not None and self.log_weights:
            import wandb

            artifact = wandb.Artifact(f"weights-{self.wandb.id}", type="model")
            artifact.add_file(str(path))
            self.wandb.log_artifact(artifact)

    def judged(self, rows: List[Dict[str, float]]) -> Dict[str, float]:
        """The accuracies the run is judged by: the last epoch's (final/...), and with a chosen best
        epoch, that epoch's (best/...: the test accuracy at the best validation epoch, never the
        best test accuracy over epochs)."""
        if not rows:
            return {}
        accuracies = [key for key in ACCURACIES if key in rows[-1]]
        judged = {f"final/{key}": rows[-1][key] for key in accuracies}
        if self.chooses:
            best = chosen_epoch(rows, self.objective, best=True)
            judged.update({"best/epoch": best["epoch"], **{f"best/{key}": best[key] for key in accuracies}})
        return judged

    def finish(self, summary: Dict[str, float], exit_code: int = 0, status: Optional[str] = None) -> None:
        """Close the W&B run (failed when exit_code != 0) and write the run's final status."""
        if self.finished or not self.main:
            self.finished = True
            return
        self.finished = True
        summary = {**self.judged(self.metrics.read()), **summary}
        try:
            if self.wandb is not None:
                self.wandb.summary.update(summary)
                self.wandb.finish(exit_code=exit_code)
                if self.wandb.offline:
                    # Every part's folder: `wandb sync` joins a resumed run's parts by its id.
                    parts = " ".join(str(folder) for folder in self._parts() if folder.name.startswith("offline-"))
                    log.info(f"W&B run saved offline; upload it with: wandb sync {parts}")
        finally:
            write_status(self.run_dir, status or ("finished" if exit_code == 0 else "failed"))

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if isinstance(exc, Stopped):
                # Stopped by a signal with last.pt written: W&B shows the run as preempted, and a
                # resume continues it.
                if self.wandb is not None:
                    self.wandb.mark_preempting()
                self.finish({}, exit_code=exc.code, status="stopped")
            elif isinstance(exc, Pruned):
                # Not a failure: the search's pruner stopped it, and the trial's state says so.
                self.finish({"trial_state": "pruned", "pruned_at_epoch": exc.epoch}, status="pruned")
            else:
                # A failed run's W&B summary says why (the same line as train.log's last).
                self.finish({} if exc is None else {"error": reason(exc)}, exit_code=0 if exc_type is None else 1)
        except UserError:
            # A status the full disk could not take says less than the error that ended the run.
            if exc is None:
                raise


def log_evaluation(cfg: DictConfig, run_dir: Path, name: str, report: Dict, wrong: List[list]) -> None:
    """An evaluation as a W&B run of its own (job_type=eval) in the training run's group (its
    W&B id when it had none): its numbers as the summary, the confusion-matrix and per-class
    charts, and a table of the most confidently wrong images (`wrong`: rows of an H x W x C
    uint8 array, true class, predicted class, confidence)."""
    import torch
    import wandb

    mode = choose_mode(cfg.logger.mode)
    if mode == "disabled":
        return
    last = rundir.last(run_dir)
    train_id = torch.load(last, weights_only=True).get("wandb_run_id") if last.is_file() else None
    # Its files in eval/wandb/, apart from the training run's.
    run = wandb.init(dir=Path(run_dir) / rundir.EVAL, mode=mode, project=cfg.logger.project, entity=cfg.logger.entity,
                     group=train_id or Path(run_dir).name, name=f"eval-{name}", job_type="eval",
                     tags=list(cfg.logger.tags), config={**OmegaConf.to_container(cfg, resolve=True),
                                                         "train_run_id": train_id, "eval_name": name})
    table = wandb.Table(columns=["image", "true", "predicted", "confidence"],
                        data=[[wandb.Image(image), *rest] for image, *rest in wrong])
    run.log({**confusion.wandb_charts(report["confusion_matrix"], report["classes"], "eval"), "eval/wrong": table})
    run.summary.update({k: v for k, v in report.items() if isinstance(v, (int, float))})
    run.finish()
    if run.offline:
        log.info(f"W&B run saved offline; upload it with: wandb sync {run.sync_dir}")
