"""The search's settings as Hydra sees them: the sweeper's schema (hydra/sweeper=resnet_lab_optuna)
and its samplers and pruners by name (hydra/sweeper/sampler=..., hydra/sweeper/pruner=...), each
the keyword arguments of its Optuna class.

Optuna itself is imported only by a search (resnet_lab.sweeps.search): Hydra imports this module
at every start, through the plugin in hydra_plugins/resnet_lab_search.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

SWEEPER = "resnet_lab_optuna"


@dataclass
class TPESampler:
    _target_: str = "optuna.samplers.TPESampler"
    seed: Optional[int] = None
    n_startup_trials: int = 10
    multivariate: bool = False
    group: bool = False
    # Parallel workers see each other's running trials as bad ones and spread out.
    constant_liar: bool = True


@dataclass
class RandomSampler:
    _target_: str = "optuna.samplers.RandomSampler"
    seed: Optional[int] = None


@dataclass
class GridSampler:
    # The grid is the search space (choice and range only), filled in by the search.
    _target_: str = "optuna.samplers.GridSampler"
    _partial_: bool = True
    seed: Optional[int] = None


@dataclass
class CmaEsSampler:
    _target_: str = "optuna.samplers.CmaEsSampler"
    seed: Optional[int] = None
    n_startup_trials: int = 1
    sigma0: Optional[float] = None
    with_margin: bool = False


@dataclass
class GPSampler:
    _target_: str = "optuna.samplers.GPSampler"
    seed: Optional[int] = None
    n_startup_trials: int = 10
    deterministic_objective: bool = False


@dataclass
class QMCSampler:
    _target_: str = "optuna.samplers.QMCSampler"
    seed: Optional[int] = None
    qmc_type: str = "sobol"
    scramble: bool = False


SAMPLERS = {"tpe": TPESampler, "random": RandomSampler, "grid": GridSampler, "cmaes": CmaEsSampler,
            "gp": GPSampler, "qmc": QMCSampler}


@dataclass
class NopPruner:
    _target_: str = "optuna.pruners.NopPruner"


@dataclass
class MedianPruner:
    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 5
    n_warmup_steps: int = 0  # epochs
    interval_steps: int = 1
    n_min_trials: int = 1


@dataclass
class PercentilePruner:
    _target_: str = "optuna.pruners.PercentilePruner"
    percentile: float = 25.0
    n_startup_trials: int = 5
    n_warmup_steps: int = 0
    interval_steps: int = 1
    n_min_trials: int = 1


@dataclass
class SuccessiveHalvingPruner:
    _target_: str = "optuna.pruners.SuccessiveHalvingPruner"
    min_resource: Any = "auto"  # epochs, or auto
    reduction_factor: int = 4
    min_early_stopping_rate: int = 0
    bootstrap_count: int = 0


@dataclass
class HyperbandPruner:
    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 1
    max_resource: Any = "auto"  # epochs, or auto: the most epochs a trial has reported
    reduction_factor: int = 3
    bootstrap_count: int = 0


@dataclass
class ThresholdPruner:
    _target_: str = "optuna.pruners.ThresholdPruner"
    lower: Optional[float] = None
    upper: Optional[float] = None
    n_warmup_steps: int = 0
    interval_steps: int = 1


PRUNERS = {"none": NopPruner, "median": MedianPruner, "percentile": PercentilePruner,
           "successive_halving": SuccessiveHalvingPruner, "hyperband": HyperbandPruner,
           "threshold": ThresholdPruner}


@dataclass
class SearchSweeperConf:
    _target_: str = "hydra_plugins.resnet_lab_search.ResnetLabOptunaSweeper"
    defaults: List[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "none"}])
    sampler: Any = MISSING
    pruner: Any = MISSING
    direction: str = "maximize"
    # None: the journal file optuna.journal in the sweep folder; else an Optuna storage URL
    # (postgresql://, mysql://, sqlite:///, redis://) or the path of a journal file.
    storage: Optional[str] = None
    study_name: str = "resnet_lab"
    n_trials: int = 20  # in the study, over every invocation and worker
    n_jobs: int = 1  # trials launched at once (hydra/launcher=joblib runs them in parallel)
    params: Optional[Dict[str, str]] = None


def register() -> None:
    store = ConfigStore.instance()
    store.store(group="hydra/sweeper", name=SWEEPER, node=SearchSweeperConf, provider="resnet_lab")
    for name, node in SAMPLERS.items():
        store.store(group="hydra/sweeper/sampler", name=name, node=node, provider="resnet_lab")
    for name, node in PRUNERS.items():
        store.store(group="hydra/sweeper/pruner", name=name, node=node, provider="resnet_lab")
