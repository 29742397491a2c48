"""A search's trial seen from inside its run: the objective reported to the study after every
epoch, and the pruner's word on whether to stop there. The search hands the trial to the run as
search.storage, search.study and search.trial; a run that is no trial reports nothing."""

from typing import Dict, List, Optional

from omegaconf import DictConfig


class Pruned(Exception):
    """The pruner stopped the trial at an epoch's end (its checkpoint and metrics written). An
    Exception, not a stop: the search tells the study and goes on to its next trial."""

    def __init__(self, trial: int, epoch: int):
        super().__init__(trial, epoch)  # the args, for pickling back from a joblib worker
        self.trial, self.epoch = trial, epoch

    def __str__(self) -> str:
        return f"pruned at epoch {self.epoch}"


class TrialReport:
    def __init__(self, search: Optional[DictConfig], objective: str, rows: List[Dict[str, float]]):
        """search: the run's search.* keys; rows: the epochs the run has already trained (a trial
        retried after its process died resumes them: its pruner sees them too)."""
        self.trial = None
        if search is None or search.trial is None:
            return
        import optuna
        from hydra.utils import instantiate

        from resnet_lab.studies import open_storage

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = open_storage(search.storage)
        study_id = storage.get_study_id_from_name(search.study)
        spec = storage.get_study_user_attrs(study_id).get("pruner")
        # The sampler draws nothing here (the search drew the params); random is the lightest.
        study = optuna.load_study(study_name=search.study, storage=storage, sampler=optuna.samplers.RandomSampler(),
                                  pruner=instantiate(spec) if spec else None)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, search.trial)
        self.trial = optuna.Trial(study, trial_id)
        reported = storage.get_trial(trial_id).intermediate_values
        for row in rows:
            if row["epoch"] not in reported:
                self.trial.report(row[objective], row["epoch"])

    def should_prune(self, epoch: int, value: float) -> bool:
        """Report the epoch's objective; whether the pruner stops the trial here."""
        if self.trial is None:
            return False
        self.trial.report(value, epoch)
        return self.trial.should_prune()
