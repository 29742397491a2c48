"""`python -m resnet_lab.compare RUNS_OR_SWEEPS... [--by-seed] [--csv FILE] [--plot FILE]`: runs side by side.

Reads the run folders only (.hydra/config.yaml, metrics.jsonl, status), so it works offline and on
runs that are still going or were interrupted. Runs are compared by their resolved configs: the
table shows every key whose value differs between them, defaults included. From a notebook,
`load_runs(paths)` gives the same records (every config key, and the results) as a list of dicts,
for `pandas.DataFrame(load_runs([...]))`.
"""

import argparse
import csv
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from resnet_lab import rundir
from resnet_lab.config import chooses_best, chosen_epoch, objective
from resnet_lab.errors import UserError
from resnet_lab.rundir import read_status
from resnet_lab.training.resume import NOISE_KEYS, flat
from resnet_lab.training.tracking import MetricsFile

# The results of a run, in the table's order; val_acc only where a run holds out a validation
# split, best_epoch and final_test_acc only where a run chooses a best epoch.
COLUMNS = ("val_acc", "test_acc", "best_epoch", "final_test_acc", "final_train_loss", "epochs", "seconds",
           "images_per_s", "status")
HEADERS = {"val_acc": "val acc", "test_acc": "test acc", "best_epoch": "best epoch",
           "final_test_acc": "final test acc", "final_train_loss": "train loss", "seconds": "time s",
           "images_per_s": "img/s"}
FORMATS = {"seconds": "{:.1f}", "images_per_s": "{:.0f}", "best_epoch": "{:.0f}"}
# Keys that say where or how a run was kept, not what it trained (besides resume.NOISE_KEYS).
UNCOMPARED = (*NOISE_KEYS, "model.init")


@dataclass
class Run:
    path: Path
    config: Dict[str, object]  # the resolved config, flattened to dotted keys
    rows: List[Dict[str, float]]
    status: str
    objective_key: str  # config.objective: val_acc with a validation split
    chooses: bool  # config.chooses_best: judged at its best epoch rather than its last

    @property
    def judged(self) -> Optional[Dict[str, float]]:
        """The epoch the run is judged by (config.chosen_epoch)."""
        return chosen_epoch(self.rows, self.objective_key, self.chooses)

    @property
    def objective(self) -> float:
        """Its objective at that epoch, what the Hydra task returns; NaN when the run diverged."""
        if not self.rows or not math.isfinite(self.rows[-1]["train_loss"]):
            return math.nan
        return self.judged.get(self.objective_key, math.nan)

    def summary(self, val: bool, best: bool) -> Dict[str, object]:
        """val: with the validation accuracy; best: with the best epoch and the final test accuracy."""
        seconds = sum(r["seconds"] for r in self.rows)
        images = sum(r["images_per_s"] * r["seconds"] for r in self.rows)
        judged, last = self.judged or {}, self.rows[-1] if self.rows else {}
        return {
            **({"val_acc": judged.get("val_acc")} if val else {}),
            "test_acc": judged.get("test_acc"),
            **({"best_epoch": judged.get("epoch") if self.chooses else None,
                "final_test_acc": last.get("test_acc")} if best else {}),
            "final_train_loss": last.get("train_loss"),
            "epochs": f"{len(self.rows)}/{self.config.get('trainer.epochs') or '?'}",
            "seconds": seconds if self.rows else None,
            "images_per_s": images / seconds if seconds else None,
            "status": self.status,
        }


def _natural(path: Path):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(path))]


def read_run(path: Path) -> Run:
    config = OmegaConf.load(path / rundir.HYDRA_RECORD / "config.yaml")
    compared = {k: v for k, v in flat(OmegaConf.to_container(config, resolve=True)).items()
                if not any(k == key or k.startswith(key + ".") for key in UNCOMPARED)}
    # No status file: the job stopped (or is) before its tracker started, e.g. on a config error.
    status = read_status(path) or "not started"
    metrics = MetricsFile(path)
    rows = metrics.read()
    if metrics.torn:
        lines = f"line{'s' if len(metrics.torn) > 1 else ''} {', '.join(map(str, metrics.torn))}"
        print(f"warning: {metrics.path}: left out {lines}, a row cut off part way (the file was copied "
              f"while it was written, or lost its end)", file=sys.stderr)
    return Run(path, compared, rows, status, objective(config), chooses_best(config))


def find_runs(paths: Sequence[Path]) -> List[Run]:
    """The run folders (those with .hydra/config.yaml) given, or under the folders given."""
    found = []
    for path in (Path(p).resolve() for p in paths):
        if (path / rundir.HYDRA_RECORD / "config.yaml").exists():
            found.append(path)
            continue
        below = sorted((c.parent.parent for c in path.rglob(f"{rundir.HYDRA_RECORD}/config.yaml")), key=_natural)
        if not below:
            raise UserError(f"{path}: no run folders there (a run folder holds .hydra/config.yaml)")
        found.extend(below)
    return [read_run(p) for p in found]


def differing(runs: Sequence[Run], ignore: Sequence[str] = ()) -> List[str]:
    """The config keys whose values differ between the runs (none for a single run)."""
    keys = sorted({k for run in runs for k in run.config} - set(ignore))
    return [k for k in keys if len({repr(run.config.get(k)) for run in runs}) > 1]


def ranked(runs: Sequence[Run]) -> List[Run]:
    """Best objective first; diverged and unfinished-without-metrics runs last; ties keep order."""
    return sorted(runs, key=lambda r: -r.objective if not math.isnan(r.objective) else math.inf)


def short(value) -> str:
    """A config value in 4 significant digits when it is a fraction; else as it is."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def label(run: Run, keys: Sequence[str]) -> str:
    return " ".join(f"{k}={short(run.config.get(k))}" for k in keys) or run.path.name


def records(runs: Sequence[Run], keys: Optional[Sequence[str]] = None) -> List[Dict[str, object]]:
    """One flat dict per run, best first: the run folder, the config keys (default: those that
    differ), the results."""
    keys = differing(runs) if keys is None else keys
    val = any("val_acc" in row for run in runs for row in run.rows)
    best = any(run.chooses for run in runs)
    return [{"run": str(run.path), **{k: run.config.get(k) for k in keys}, **run.summary(val, best)}
            for run in ranked(runs)]


def load_runs(paths: Sequence[Path]) -> List[Dict[str, object]]:
    """Every run under `paths` as a record, best first: `run` (its folder), every key of its
    resolved config (dotted, e.g. `optim.lr`), and its results (`val_acc` and `test_acc` at the
    epoch it is judged by, `best_epoch`, `final_test_acc`, `final_train_loss`, `epochs`,
    `seconds`, `images_per_s`, `status`). Raises UserError where a path holds no run."""
    runs = find_runs(paths)
    return records(runs, sorted({k for run in runs for k in run.config}))


def by_seed(runs: Sequence[Run]) -> List[Dict[str, object]]:
    """Runs that differ only in `seed` as one record: each numeric result's mean, and its standard
    deviation as <column>_std (over at least two seeds), best mean first."""
    keys = differing(runs, ignore=("seed",))
    groups: Dict[str, List[Run]] = {}
    for run in runs:
        groups.setdefault(repr([run.config.get(k) for k in keys]), []).append(run)
    merged = []
    for members in groups.values():
        rows = records(members, keys=[])
        record = {"run": f"{len(members)} seeds ({', '.join(short(m.config.get('seed')) for m in members)})",
                  **{k: members[0].config.get(k) for k in keys}}
        for column in rows[0]:
            values = [row[column] for row in rows if isinstance(row[column], (int, float))]
            if column in COLUMNS and values and len(values) == len(rows):
                record[column] = statistics.fmean(values)
                if len(values) > 1 and column not in ("best_epoch",):
                    record[f"{column}_std"] = statistics.stdev(values)
            elif column in COLUMNS:
                record[column] = "/".join(sorted({str(row[column]) for row in rows}))
        merged.append(record)
    key = "val_acc" if any("val_acc" in r for r in merged) else "test_acc"
    return sorted(merged, key=lambda r: -r[key] if isinstance(r.get(key), float) else math.inf)


def _cell(column: str, value, row: Dict[str, object]) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        shown = FORMATS.get(column, "{:.4f}").format(value)
        spread = row.get(f"{column}_std")
        return f"{shown} ± {FORMATS.get(column, '{:.4f}').format(spread)}" if spread is not None else shown
    if column not in COLUMNS and column != "run":
        return short(value)  # exact in the CSV
    return str(value)


def table(rows: List[Dict[str, object]], base: Optional[Path] = None, title: str = "") -> Table:
    out = Table(title=title or None)
    columns = [c for c in rows[0] if not c.endswith("_std")]
    for column in columns:
        numeric = column in COLUMNS and column != "status"
        out.add_column(HEADERS.get(column, column), justify="right" if numeric else "left")
    for row in rows:
        run = Path(row["run"])
        shown = {**row, "run": str(run.relative_to(base)) if base and run.is_absolute() else run.name}
        out.add_row(*(_cell(k, shown[k], row) for k in columns))
    return out


def show(rows: List[Dict[str, object]], title: str = "") -> None:
    """Print the table; when printing to a file or pipe, as wide as it needs rather than 80."""
    paths = [row["run"] for row in rows if Path(row["run"]).is_absolute()]
    base = Path(os.path.commonpath(paths)) if len(paths) > 1 else None
    if base is not None and not title:
        title = f"runs under {base}"
    out = table(rows, base, title)
    console = Console()
    if not console.is_terminal:
        # Rich wraps a title to its table's width, and the title holds the runs' common folder.
        out.min_width = len(title)
        wide = console.options.update(max_width=10_000)
        console = Console(width=max(80, Measurement.get(console, wide, out).maximum))
    console.print(out)


def write_csv(rows: List[Dict[str, object]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)


def plot(runs: Sequence[Run]):
    """The accuracy the runs are judged on (validation where they hold out a split, else test)
    and train loss per epoch, one line per run, labelled by its differing config keys."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    keys = differing(runs)
    split = "val" if any("val_acc" in row for run in runs for row in run.rows) else "test"
    figure = Figure(figsize=(11, 4.5 + 0.25 * len(runs)), layout="constrained")
    acc, loss = figure.subplots(1, 2)
    for run in runs:
        epochs = [r["epoch"] for r in run.rows]
        acc.plot(epochs, [r.get(f"{split}_acc", math.nan) for r in run.rows], marker=".", label=label(run, keys))
        loss.plot(epochs, [r["train_loss"] for r in run.rows], marker=".", label=label(run, keys))
    for axes, name in ((acc, f"{'validation' if split == 'val' else 'test'} accuracy"), (loss, "train loss")):
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


def describe_best(run: Run, keys: Sequence[str]) -> str:
    """The best run's line: its folder, its objective (at its best epoch, with the test accuracy
    there, when it chooses one) and its differing keys."""
    judged, where, kind = run.judged, "", "final"
    if run.chooses:
        kind, where = "best", f" at epoch {judged['epoch']}"
        if run.objective_key != "test_acc":
            where += f", test acc {judged['test_acc']:.4f}"
    return (f"best run: {run.path}  {kind} {run.objective_key.replace('_', ' ')} {run.objective:.4f}{where}  "
            f"{label(run, keys)}")


class SweepSummary(Callback):
    """At the end of a sweep: its runs side by side, then the best run and its folder."""

    def on_multirun_end(self, config, **kwargs) -> None:
        self.summarise(Path(config.hydra.sweep.dir))

    @staticmethod
    def summarise(sweep_dir: Path) -> None:
        try:
            found = find_runs([sweep_dir])
        except UserError:
            return
        # A job refused before it trained (a value out of range, other settings than the finished
        # run in its folder) leaves that folder's earlier run, which is not the sweep's result.
        not_run = rundir.not_run(sweep_dir)
        runs = [run for run in found if run.path not in not_run]
        if runs:
            show(records(runs), title=f"sweep {sweep_dir}")
        left_out = [run.path.name for run in found if run.path in not_run]
        if left_out:
            Console().print(f"not run: {', '.join(left_out)} (failed before training; left out: what "
                            f"{'their folders hold' if len(left_out) > 1 else 'its folder holds'} is from before "
                            f"this sweep)", soft_wrap=True)
        pruned = [run for run in runs if run.status == "pruned"]
        if pruned:
            planned = sum(run.config.get("trainer.epochs") or 0 for run in runs)
            saved = sum((run.config.get("trainer.epochs") or 0) - len(run.rows) for run in pruned)
            Console().print(f"pruned: {', '.join(f'{run.path.name} at epoch {len(run.rows)}' for run in pruned)}; "
                            f"pruning saved {saved} of {planned} planned epochs", soft_wrap=True)
        top = best(runs)
        Console().print("best run: none, no run finished" if top is None else describe_best(top, differing(runs)),
                        soft_wrap=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m resnet_lab.compare", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run folders, or sweep folders holding them")
    parser.add_argument("--by-seed", action="store_true",
                        help="one row for the runs that differ only in seed: mean ± standard deviation")
    parser.add_argument("--csv", type=Path, help="also write the table to this CSV file")
    parser.add_argument("--plot", type=Path, help="also draw the curves into this image (e.g. out.png)")
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.paths)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    rows = by_seed(runs) if args.by_seed else records(runs)
    show(rows)
    if args.csv:
        write_csv(rows, args.csv)
    if args.plot:
        plot(runs).savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
