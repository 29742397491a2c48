"""A transient progress bar for the terminal, shared by training and the image_folder cache."""

import sys

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class ProgressBar:
    """A transient progress bar; nothing at all when not on a terminal."""

    def __init__(self, enabled: bool, label: str, total: int, start: int = 0):
        self.bar = None
        if enabled and sys.stdout.isatty():
            self.bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                transient=True)
            self.task = self.bar.add_task(label, total=total, completed=start)

    def __enter__(self):
        if self.bar is not None:
            self.bar.start()
        return self

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, steps)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
