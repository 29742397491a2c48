"""What a search found: the best trial (its params, value, run folder, and the test accuracy at
its best validation epoch), optimization_results.yaml and Optuna's plots as PNG files in the
sweep folder; at the end of every search and on demand, `python -m resnet_lab.search SWEEP_DIR`."""

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import OmegaConf

from resnet_lab.errors import UserError
from resnet_lab.training.tracking import MetricsFile

log = logging.getLogger("resnet_lab")

RECORD = "search.yaml"  # the study's storage and name, for this module's command line
RESULTS = "optimization_results.yaml"
PLOTS = {"optimization_history": "plot_optimization_history", "param_importances": "plot_param_importances",
         "intermediate_values": "plot_intermediate_values"}


def record(sweep_dir: Path, url: str, study_name: str) -> None:
    OmegaConf.save(OmegaConf.create({"storage": url, "study_name": study_name}), Path(sweep_dir) / RECORD)


def test_at_best_epoch(run_dir: Path, metric: str) -> Optional[float]:
    """The run's test accuracy at the epoch its `metric` was best (None without both)."""
    rows = [r for r in MetricsFile(run_dir).read() if metric in r and "test_acc" in r]
    return max(rows, key=lambda r: r[metric])["test_acc"] if rows else None


def plot(study, sweep_dir: Path) -> list:
    """Optuna's matplotlib plots of the study, as <sweep dir>/<name>.png; the files written. A
    plot the study has too little for (importances need two finished trials) is left out."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as plots

    written = []
    for name, function in PLOTS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            try:
                axes = getattr(plots, function)(study)
            except (ValueError, RuntimeError) as e:
                log.info(f"no {name} plot: {e}")
                continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        path = Path(sweep_dir) / f"{name}.png"
        figure.savefig(path, dpi=110, bbox_inches="tight")
        matplotlib.pyplot.close(figure)
        written.append(path)
    return written


def summarise(study, sweep_dir: Path) -> None:
    """Log the study's best trial and write optimization_results.yaml and the plots."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    states = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    log.info(f"study {study.study_name}: " + ", ".join(f"{n} {state}" for state, n in states.items() if n))
    if not complete:
        if trials and all(t.state == TrialState.FAIL for t in trials):
            raise UserError("every trial of the Optuna search failed (the 'Failed experiment' lines above say why)")
        log.info("best trial: none has finished")
        return
    best = study.best_trial
    folder = Path(sweep_dir) / best.user_attrs.get("folder", str(best.number))
    test = test_at_best_epoch(folder, "val_acc")
    at_best = f", test acc {test:.4f} at its best validation epoch" if test is not None else ""
    log.info(f"best trial {best.number}: value {best.value:.4f}{at_best}, {best.params}, in {folder}")
    OmegaConf.save(OmegaConf.create({"name": "optuna", "study_name": study.study_name, "best_trial": best.number,
                                     "best_params": best.params, "best_value": best.value,
                                     "best_run": str(folder), "best_trial_test_acc": test}),
                   Path(sweep_dir) / RESULTS)
    plot(study, sweep_dir)


def main(argv: Optional[Sequence[str]] = None) -> None:
    import optuna

    from resnet_lab.studies import open_storage

    parser = argparse.ArgumentParser(prog="python -m resnet_lab.search", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="the search's sweep folder (it holds search.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        path = args.sweep_dir / RECORD
        if not path.is_file():
            raise UserError(f"{args.sweep_dir}: not a search's sweep folder (it has no {RECORD})")
        saved = OmegaConf.load(path)
        study = optuna.load_study(study_name=saved.study_name, storage=open_storage(saved.storage))
        summarise(study, args.sweep_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
