"""Where metrics go: the console (a line per epoch, a progress bar), metrics.jsonl, and loggers."""

import json
import logging
import sys
from pathlib import Path
from typing import Dict

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

log = logging.getLogger("resnet_lab")

METRICS_FILE = "metrics.jsonl"


def format_epoch(m: Dict[str, float], epochs: int) -> str:
    return (f"epoch {m['epoch']}/{epochs}  train loss {m['train_loss']:.4f}  "
            f"train acc {m['train_acc']:.4f}  test acc {m['test_acc']:.4f}  "
            f"{m['seconds']:.1f} s  {m['images_per_s']:.0f} img/s")


class EpochProgress:
    """A transient progress bar over one epoch's steps; nothing at all when not on a terminal."""

    def __init__(self, enabled: bool, epoch: int, epochs: int, total: int, start: int = 0):
        self.bar = None
        if enabled and sys.stdout.isatty():
            self.bar = Progress(TextColumn(f"epoch {epoch}/{epochs}"), BarColumn(),
                                MofNCompleteColumn(), TimeRemainingColumn(), transient=True)
            self.task = self.bar.add_task("train", total=total, completed=start)

    def __enter__(self):
        if self.bar is not None:
            self.bar.start()
        return self

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()


class MetricsFile:
    """One JSON object per epoch, appended and flushed as soon as the epoch ends."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / METRICS_FILE

    def write(self, metrics: Dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")


class Tracker:
    """Fans each epoch's metrics out to the console and metrics.jsonl."""

    def __init__(self, run_dir: Path, epochs: int):
        self.metrics = MetricsFile(run_dir)
        self.epochs = epochs

    def epoch(self, metrics: Dict[str, float]) -> None:
        log.info(format_epoch(metrics, self.epochs))
        self.metrics.write(metrics)
