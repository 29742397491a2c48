"""The Optuna search: a Hydra sweeper that draws trials from a persistent study with Optuna's
ask/tell interface, launches each as a resnet_lab run in <sweep dir>/<trial number>, and tells
the study how it ended (its objective, pruned, or failed).

Every worker (a rerun of the command, another process or machine on the same storage) follows
the same loop: take back the trials whose process died (resnet_lab.sweeps.claims) as waiting
copies that resume in the dead one's run folder, top the study up to n_trials waiting trials,
then draw the waiting ones until none is left. A waiting trial passes from WAITING to RUNNING
in one storage transaction, so no two workers draw the same one and the study never holds more
than n_trials (a trial that died and was retried counts once, as its retry).
"""

import itertools
import logging
import math
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus, configure_log
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from resnet_lab.config import objective, validate
from resnet_lab.errors import UserError, closest
from resnet_lab.training.resume import override_key
from resnet_lab.sweeps import results, space as search_space
from resnet_lab.sweeps.claims import Claims
from resnet_lab.studies import default_url, open_storage
from resnet_lab.training.trial import Pruned

log = logging.getLogger("resnet_lab")

DIRECTIONS = ("maximize", "minimize")
# A search holds this share of the training set out to choose on, unless dataset.val_fraction is set.
VAL_FRACTION = 0.1


def counted(trials) -> list:
    """The study's trials that count towards n_trials: all but the failed ones that were retried."""
    from optuna.trial import TrialState

    retried = {t.user_attrs.get("retry_of") for t in trials}
    return [t for t in trials if not (t.state == TrialState.FAIL and t.number in retried)]


def _quoted(value: str) -> str:
    """value as one quoted Hydra override value."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class OptunaSearch:
    def __init__(self, sampler, pruner, direction: str, storage: Optional[str],
                 study_name: str, n_trials: int, n_jobs: int, params: Optional[DictConfig]):
        # Hydra hands them over made (the grid sampler's partial, until the space is known).
        self.sampler = sampler
        self.direction, self.storage_url, self.study_name = direction, storage, study_name
        self.n_trials, self.n_jobs, self.params = n_trials, n_jobs, params

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(config=config, hydra_context=hydra_context,
                                                                task_function=task_function)
        self.sweep_dir = Path(config.hydra.sweep.dir)

    # -- before any trial: every input checked -------------------------------------------------

    def _check_settings(self) -> None:
        if self.direction not in DIRECTIONS:
            raise UserError(f"hydra.sweeper.direction={self.direction}: must be one of {', '.join(DIRECTIONS)}"
                            f"{closest(self.direction, DIRECTIONS)}")
        for key, value in (("n_trials", self.n_trials), ("n_jobs", self.n_jobs)):
            if value < 1:
                raise UserError(f"hydra.sweeper.{key}={value}: must be >= 1")

    def _compose(self, overrides: Sequence[str]) -> DictConfig:
        """The config a trial with these overrides runs, checked as the run would check it."""
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        validate(OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"]))
        return cfg

    def _check_space(self, fixed: List[str]) -> DictConfig:
        """Compose a trial at each end of every interval and at every choice (a key the config
        lacks, an option a group lacks, a value its schema refuses are each one line here
        rather than a failed trial); the config of the first."""
        names = list(self.space)
        tried = [search_space.values(self.space[name]) for name in names]
        first = None
        for i in range(max((len(v) for v in tried), default=1)):
            params = {name: values[i % len(values)] for name, values in zip(names, tried)}
            try:
                cfg = self._compose([*fixed, *search_space.as_overrides(params)])
            except UserError as e:
                shown = ", ".join(search_space.as_overrides(params))
                raise UserError(f"{e} (in the search space, at {shown})" if shown else str(e)) from e
            first = first if first is not None else cfg
        return first

    def _selection(self, fixed: List[str], cfg: DictConfig) -> List[str]:
        """The overrides that hold out a validation split when none is set, so that the search
        never selects on the test set unless told to."""
        set_here = any(override_key(o) == "dataset.val_fraction" for o in [*fixed, *self.space])
        if set_here or cfg.dataset.val_fraction:
            return []
        return [f"dataset.val_fraction={VAL_FRACTION}"]

    def _first_line(self, cfg: DictConfig, defaulted: bool) -> str:
        metric = objective(cfg)
        sampler = self.config.hydra.runtime.choices.get("hydra/sweeper/sampler", "?")
        pruner = self.config.hydra.runtime.choices.get("hydra/sweeper/pruner", "?")
        if cfg.dataset.val_fraction:
            why = " (the search's default: dataset.val_fraction is unset)" if defaulted else ""
            on = (f"on a validation split of {cfg.dataset.val_fraction:g} of the training set{why}, "
                  f"not the test set")
        else:
            on = "on the TEST set (dataset.val_fraction=0): its best is chosen on the data it is scored on"
        return (f"search {self.study_name}: {self.direction} {metric} {on}; {self.n_trials} trials in the "
                f"study, sampler {sampler}, pruner {pruner}; storage {self.url}")

    def _open_study(self):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.storage = open_storage(self.url)
        sampler, self.grid = self.sampler, None
        if self.config.hydra.runtime.choices.get("hydra/sweeper/sampler") == "grid":
            # The search queues the grid's points itself (_top_up): the sampler only hands them out.
            self.grid = self._grid()
            sampler = sampler(search_space=self.grid)
        study = optuna.create_study(study_name=self.study_name, storage=self.storage, sampler=sampler,
                                    direction=self.direction, load_if_exists=True)
        if study.direction.name.lower() != self.direction:
            raise UserError(f"hydra.sweeper.direction={self.direction}: study {self.study_name} in {self.url} "
                            f"was created to {study.direction.name.lower()}; choose another "
                            f"hydra.sweeper.study_name for a new study")
        space = {name: optuna.distributions.distribution_to_json(d) for name, d in self.space.items()}
        saved = study.user_attrs.get("space")
        if saved is not None and saved != space:
            differ = sorted(k for k in saved.keys() | space.keys() if saved.get(k) != space.get(k))
            raise UserError(f"study {self.study_name} in {self.url} was created with another search space "
                            f"(differing: {', '.join(differ)}); choose another hydra.sweeper.study_name for "
                            f"this one, or search the study's own space")
        study.set_user_attr("space", space)
        # Each trial's run builds the pruner from here (resnet_lab.training.trial).
        study.set_user_attr("pruner", OmegaConf.to_container(self.config.hydra.sweeper.pruner, resolve=True))
        return study

    def _grid(self) -> Dict[str, list]:
        grid = {name: search_space.grid(d) for name, d in self.space.items()}
        continuous = [name for name, values in grid.items() if values is None]
        if continuous:
            raise UserError(f"hydra/sweeper/sampler=grid: {', '.join(continuous)} is continuous; the grid "
                            f"takes choice(...) and range(...) only")
        self.n_trials = min(self.n_trials, math.prod(len(v) for v in grid.values()))
        return grid

    # -- the loop --------------------------------------------------------------------------------

    def sweep(self, arguments: List[str]) -> None:
        self._check_settings()
        params = [f"{k}={v}" for k, v in (self.params or {}).items()]
        self.space, fixed = search_space.parse([*params, *arguments])
        cfg = self._check_space(fixed)
        selection = self._selection(fixed, cfg)
        if selection:
            cfg = self._compose([*fixed, *selection, *search_space.as_overrides(
                {name: search_space.values(d)[0] for name, d in self.space.items()})])
        self.fixed = [*fixed, *selection]
        self.url = self.storage_url or default_url(self.sweep_dir)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(self._first_line(cfg, bool(selection)))
        study = self._open_study()
        results.record(self.sweep_dir, self.url, self.study_name)
        self.claims = Claims(self.sweep_dir)
        try:
            self._reclaim(study)
            with self.claims.study():
                self._top_up(study)
            while True:
                batch = list(filter(None, (self._draw(study) for _ in range(self.n_jobs))))
                if not batch:
                    break
                self._launch(study, batch)
        finally:
            self.claims.release_all()
        results.summarise(study, self.sweep_dir)

    def _top_up(self, study) -> None:
        """Queue waiting trials until the study holds n_trials: empty ones, whose params the
        sampler draws when they start; for the grid, each point of it not yet queued."""
        trials = counted(study.get_trials(deepcopy=False))
        missing = self.n_trials - len(trials)
        if self.grid is None:
            for _ in range(missing):
                study.enqueue_trial({})
            return
        queued = [t.system_attrs.get("fixed_params", t.params) for t in trials]
        points = (dict(zip(self.grid, values)) for values in itertools.product(*self.grid.values()))
        for point in [p for p in points if p not in queued][:max(missing, 0)]:
            study.enqueue_trial(point)

    def _state(self, trial_id: int):
        return self.storage.get_trial(trial_id).state

    def _draw(self, study):
        """The next waiting trial, held (claims) and running; None when none waits."""
        import optuna
        from optuna.trial import TrialState

        while True:
            # Study.ask, less its fallback of a new trial when none waits (which would go past
            # n_trials); relies on Optuna's Study internals (tests/test_search.py).
            study._thread_local.cached_all_trials = None
            trial_id = study._pop_waiting_trial_id()
            if trial_id is None:
                return None
            trial = optuna.Trial(study, trial_id)
            self.claims.hold(trial.number)
            if self._state(trial_id) == TrialState.RUNNING:
                if "folder" not in trial.user_attrs:
                    trial.set_user_attr("folder", str(trial.number))
                return trial
            self.claims.release(trial.number)  # taken back as dead between its draw and its lock

    def _reclaim(self, study) -> None:
        """Fail each running trial of this sweep folder that no live process holds, and queue a
        retry of it (same params, same run folder, so it resumes from its last checkpoint)."""
        from optuna.trial import TrialState

        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if (trial.number in self.claims.held or not self.claims.known(trial.number)
                    or not self.claims.hold(trial.number, block=False)):
                continue
            try:
                if self._state(trial._trial_id) == TrialState.RUNNING:
                    self._retry(study, trial, "its process died (no live process holds it)")
            finally:
                self.claims.release(trial.number)

    def _retry(self, study, trial, why: str) -> None:
        from optuna.trial import TrialState

        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        folder = trial.user_attrs.get("folder", str(trial.number))
        study.enqueue_trial(trial.params, user_attrs={**trial.user_attrs, "folder": folder, "retry_of": trial.number})
        log.warning(f"trial {trial.number}: {why}; marked failed and queued again, to resume in "
                    f"{self.sweep_dir / folder}")

    def _overrides(self, trial) -> List[str]:
        params = {name: trial._suggest(name, d) for name, d in self.space.items()}
        return [*self.fixed, *search_space.as_overrides(params), f"hydra.sweep.subdir={trial.user_attrs['folder']}",
                f"search.storage={_quoted(self.url)}", f"search.study={_quoted(self.study_name)}",
                f"search.trial={trial.number}"]

    def _launch(self, study, batch) -> None:
        overrides = [self._overrides(trial) for trial in batch]
        try:
            try:
                returns = self.launcher.launch(overrides, initial_job_idx=batch[0].number)
            except BaseException:
                # Stopped by a signal (last.pt written), or the launcher failed: the next run of the
                # command resumes these.
                for trial in batch:
                    self._retry(study, trial, "its run was interrupted")
                raise
            finally:
                # A job's logging stays configured after it: the search's lines go back to Hydra's.
                configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
            # Told while still held: another search process takes a running trial whose claim is
            # free for dead, and would fail it and queue it again.
            for trial, ret in zip(batch, returns):
                self._tell(study, trial, ret)
        finally:
            for trial in batch:
                self.claims.release(trial.number)

    def _tell(self, study, trial, ret: JobReturn) -> None:
        from optuna.trial import TrialState

        if ret.status == JobStatus.FAILED and isinstance(ret._return_value, Pruned):
            study.tell(trial, state=TrialState.PRUNED)
            log.info(f"trial {trial.number}: {ret._return_value}")
            return
        try:
            value = float(ret.return_value)  # a failed job's error is raised here
        except Exception as e:  # noqa: BLE001 (whatever the trial raised: the search goes on)
            study.tell(trial, state=TrialState.FAIL)
            log.warning(f"Failed experiment: {e}")
            return
        if not math.isfinite(value):
            study.tell(trial, state=TrialState.FAIL)
            log.warning(f"Failed experiment: trial {trial.number} returned {value}")
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # GridSampler's note that the grid is exhausted
            study.tell(trial, value)

