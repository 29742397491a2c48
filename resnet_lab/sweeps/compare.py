"""`python -m resnet_lab.compare RUNS_OR_SWEEPS... [--csv FILE] [--plot FILE]`: runs side by side.

Reads the run folders only (.hydra/config.yaml, .hydra/overrides.yaml, metrics.jsonl, status), so
it works offline and on runs that are still going or were interrupted.
"""

import argparse
import csv
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from resnet_lab.config import objective
from resnet_lab.errors import UserError
from resnet_lab.rundir import read_status
from resnet_lab.training.resume import meaningful, override_key
from resnet_lab.training.tracking import MetricsFile

# final_val_acc only when a run holds out a validation split.
COLUMNS = ("final_val_acc", "best_test_acc", "final_test_acc", "final_train_loss", "epochs", "seconds",
           "images_per_s", "status")


@dataclass
class Run:
    path: Path
    overrides: List[str]
    planned_epochs: Optional[int]
    rows: List[Dict[str, float]]
    status: str
    objective_key: str = "test_acc"  # config.objective: val_acc with a validation split

    @property
    def params(self) -> Dict[str, str]:
        return {override_key(o): o.split("=", 1)[1] for o in self.overrides}

    @property
    def objective(self) -> float:
        """The final value of its objective, what the Hydra task returns; NaN when the run diverged."""
        if not self.rows or not math.isfinite(self.rows[-1]["train_loss"]):
            return math.nan
        return self.rows[-1].get(self.objective_key, math.nan)

    def summary(self, val: bool = False) -> Dict[str, object]:
        """val: with the final validation accuracy."""
        seconds = sum(r["seconds"] for r in self.rows)
        images = sum(r["images_per_s"] * r["seconds"] for r in self.rows)
        last = self.rows[-1] if self.rows else {}
        return {
            **({"final_val_acc": last.get("val_acc")} if val else {}),
            "best_test_acc": max((r["test_acc"] for r in self.rows), default=None),
            "final_test_acc": last.get("test_acc"),
            "final_train_loss": last.get("train_loss"),
            "epochs": f"{len(self.rows)}/{self.planned_epochs or '?'}",
            "seconds": seconds if self.rows else None,
            "images_per_s": images / seconds if seconds else None,
            "status": self.status,
        }


def _natural(path: Path):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(path))]


def read_run(path: Path) -> Run:
    hydra_dir = path / ".hydra"
    config = OmegaConf.load(hydra_dir / "config.yaml")
    overrides_file = hydra_dir / "overrides.yaml"
    overrides = list(OmegaConf.load(overrides_file)) if overrides_file.exists() else []
    # No status file: the job stopped (or is) before its tracker started, e.g. on a config error.
    status = read_status(path) or "not started"
    return Run(path, meaningful(overrides), OmegaConf.select(config, "trainer.epochs"),
               MetricsFile(path).read(), status, objective(config))


def find_runs(paths: Sequence[Path]) -> List[Run]:
    """The run folders (those with .hydra/config.yaml) given, or under the folders given."""
    found = []
    for path in map(Path, paths):
        if (path / ".hydra" / "config.yaml").exists():
            found.append(path)
            continue
        below = sorted((c.parent.parent for c in path.rglob(".hydra/config.yaml")), key=_natural)
        if not below:
            raise UserError(f"{path}: no run folders there (a run folder holds .hydra/config.yaml)")
        found.extend(below)
    return [read_run(p) for p in found]


def varying(runs: Sequence[Run]) -> List[str]:
    """The override keys whose values differ between the runs (all of them for a single run)."""
    keys = sorted({k for run in runs for k in run.params})
    if len(runs) < 2:
        return keys
    return [k for k in keys if len({run.params.get(k) for run in runs}) > 1]


def ranked(runs: Sequence[Run]) -> List[Run]:
    """Best objective first; diverged and unfinished-without-metrics runs last; ties keep order."""
    return sorted(runs, key=lambda r: -r.objective if not math.isnan(r.objective) else math.inf)


def short(value: str) -> str:
    """A swept number, as typed or as Optuna drew it, in 4 significant digits; else as it is."""
    try:
        return value if value.isdigit() else f"{float(value):.4g}"
    except ValueError:
        return value


def label(run: Run, keys: Sequence[str]) -> str:
    return " ".join(f"{k}={short(run.params[k])}" for k in keys if k in run.params) or run.path.name


def records(runs: Sequence[Run]) -> List[Dict[str, object]]:
    """One flat dict per run, best first: the run folder, the varying overrides, the results."""
    keys = varying(runs)
    val = any("val_acc" in row for run in runs for row in run.rows)
    return [{"run": str(run.path), **{k: run.params.get(k, "") for k in keys}, **run.summary(val)}
            for run in ranked(runs)]


HEADERS = {"final_val_acc": "val acc", "best_test_acc": "best acc", "final_test_acc": "final acc", "final_train_loss": "train loss",
           "seconds": "time s", "images_per_s": "img/s"}
FORMATS = {"seconds": "{:.1f}", "images_per_s": "{:.0f}"}


def _cell(column: str, value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return FORMATS.get(column, "{:.4f}").format(value)
    if isinstance(value, str) and column not in COLUMNS and column != "run":
        return short(value)  # exact in the CSV
    return str(value)


def table(rows: List[Dict[str, object]], base: Optional[Path] = None, title: str = "") -> Table:
    out = Table(title=title or None)
    for column in rows[0]:
        numeric = column in COLUMNS and column != "status"
        out.add_column(HEADERS.get(column, column), justify="right" if numeric else "left")
    for row in rows:
        run = Path(row["run"])
        shown = {**row, "run": str(run.relative_to(base)) if base else run.name}
        out.add_row(*(_cell(k, v) for k, v in shown.items()))
    return out


def show(rows: List[Dict[str, object]], title: str = "") -> None:
    """Print the table; when printing to a file or pipe, as wide as it needs rather than 80."""
    paths = [row["run"] for row in rows]
    base = Path(os.path.commonpath(paths)) if len(paths) > 1 else None
    if base is not None and not title:
        title = f"runs under {base}"
    out = table(rows, base, title)
    console = Console()
    if not console.is_terminal:
        wide = console.options.update(max_width=10_000)
        console = Console(width=max(80, Measurement.get(console, wide, out).maximum))
    console.print(out)


def write_csv(rows: List[Dict[str, object]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(runs: Sequence[Run]):
    """Test accuracy and train loss per epoch, one line per run, labelled by its overrides."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    keys = varying(runs)
    figure = Figure(figsize=(11, 4.5 + 0.25 * len(runs)), layout="constrained")
    acc, loss = figure.subplots(1, 2)
    for run in runs:
        epochs = [r["epoch"] for r in run.rows]
        acc.plot(epochs, [r["test_acc"] for r in run.rows], marker=".", label=label(run, keys))
        loss.plot(epochs, [r["train_loss"] for r in run.rows], marker=".", label=label(run, keys))
    for axes, name in ((acc, "test accuracy"), (loss, "train loss")):
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel(name)
        axes.grid(alpha=0.3)
    figure.legend(*acc.get_legend_handles_labels(), loc="outside lower center", fontsize="small")
    return figure


def best(runs: Sequence[Run]) -> Optional[Run]:
    """The finished run with the highest objective; the first of equals, as Optuna picks."""
    top = [run for run in ranked(runs) if run.status == "finished" and not math.isnan(run.objective)]
    return top[0] if top else None


class SweepSummary(Callback):
    """At the end of a sweep: its runs side by side, then the best run and its folder."""

    def on_multirun_end(self, config, **kwargs) -> None:
        self.summarise(Path(config.hydra.sweep.dir))

    @staticmethod
    def summarise(sweep_dir: Path) -> None:
        try:
            runs = find_runs([sweep_dir])
        except UserError:
            return
        show(records(runs), title=f"sweep {sweep_dir}")
        console = Console()
        top = best(runs)
        if top is None:
            console.print("best run: none, no run finished", soft_wrap=True)
        else:
            console.print(f"best run: {top.path}  final {top.objective_key.replace('_', ' ')} {top.objective:.4f}  "
                          f"{label(top, varying(runs))}", soft_wrap=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m resnet_lab.compare", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run folders, or sweep folders holding them")
    parser.add_argument("--csv", type=Path, help="also write the table to this CSV file")
    parser.add_argument("--plot", type=Path, help="also draw the curves into this image (e.g. out.png)")
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.paths)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    rows = records(runs)
    show(rows)
    if args.csv:
        write_csv(rows, args.csv)
    if args.plot:
        plot(runs).savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
