"""`PruningAwareOptunaSearch`: Ray Tune's `OptunaSearch` made to keep the Optuna study an exact
record of the sweep, which `--resume` trusts. Runs in the driver, inside Tune's controller.

Ray's OptunaSearch tells Optuna COMPLETE whenever the last result has the metric, so an
ASHA-stopped trial would enter the study as finished with a truncated score. Here a trial's
natural last epoch carries ``final = 1``; any other ending was the scheduler's (PRUNED). A failed
trial is FAIL with Ray's reason as its ``fail_reason`` user attribute. After a killed driver the
study may hold trials Tune's saved state never heard of: they are adopted or counted, never
asked for twice (see `_orphan`).
"""
from __future__ import annotations

import warnings
from pathlib import Path

from optuna.trial import FrozenTrial, TrialState
from ray.tune.result import TRAINING_ITERATION
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch
from ray.tune.utils.util import unflatten_dict

from msa.platform.core.compat import (
    live_trial,
    ray_train_session_dir,
    searcher_completed,
    searcher_study,
    searcher_trials,
    storage_id,
    stored_trial,
)
from msa.platform.tracking.client import TRIAL_TAG
from msa.platform.sweep.warm_start import own_trials
from msa.platform.tracking.runs import failure_reason


ASKED = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def trial_dirname(trial) -> str:
    """Tune's folder for a trial: its id, as in `trials/` (Tune's default spells out every param)."""
    return trial.trial_id


class PruningAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that records scheduler-stopped trials as PRUNED and errored ones as FAIL,
    and stops at the budget counted on the study (see the module docstring).

    Args:
        errors_dir: Tune's experiment folder, where each trial's ``error.txt`` ends up.
        budget: the pair's trials; the study never holds more.
    """

    def __init__(self, *args, errors_dir: str, budget: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.errors_dir, self.budget = errors_dir, budget

    def suggest(self, trial_id: str) -> dict | str | None:
        study, trials = searcher_study(self), searcher_trials(self)
        orphan = self._orphan()
        if orphan is not None:  # the budget's trial that a killed driver asked for: run it now
            trials[trial_id] = live_trial(study, storage_id(orphan))
            trials[trial_id].set_user_attr(TRIAL_TAG, trial_id)
            return unflatten_dict(orphan.params)
        # A WAITING trial is one queued to be asked next (the model's defaults): not yet one of the
        # budget's; nor are trials carried from earlier sweeps.
        if len(own_trials(study, ASKED)) >= self.budget:
            return Searcher.FINISHED  # the study holds the budget, some trials finished unknown to Tune's state
        suggestion = super().suggest(trial_id)
        if trial_id in trials:  # link the study's record to the Ray trial and its folder
            trials[trial_id].set_user_attr(TRIAL_TAG, trial_id)
        return suggestion

    def _orphan(self) -> FrozenTrial | None:
        """A RUNNING study trial that no trial of this Tune run owns.

        Tune saves its experiment state every few seconds, Optuna commits at once: a driver
        killed in between (SIGKILL, a lost head node) leaves the study a trial that the restored
        Tune run never heard of. It is handed to the next new Tune trial instead of asking
        Optuna for one more; and a trial that finished in that gap still counts: `suggest`
        stops at the study's size, not Tune's count, so the study ends with exactly the budget."""
        owned = {storage_id(trial) for trial in searcher_trials(self).values()}
        running = searcher_study(self).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return next((t for t in running if storage_id(t) not in owned), None)

    def _already_finished(self, trial_id: str) -> bool:
        """Finished before a killed driver's last saved state knew it; Tune restored it as
        unfinished and `run_trial` only reports the study's result again."""
        trial = searcher_trials(self).get(trial_id)
        return trial is not None and stored_trial(searcher_study(self), storage_id(trial)).state.is_finished()

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if not self._already_finished(trial_id):
            with warnings.catch_warnings():  # a trial that started over reports its epochs again; Optuna keeps the first
                warnings.filterwarnings("ignore", message="The reported value is ignored because this `step=")
                super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        trials, completed = searcher_trials(self), searcher_completed(self)
        if trial_id in completed or trial_id not in trials:
            return super().on_trial_complete(trial_id, result, error)
        trial = trials[trial_id]
        if self._already_finished(trial_id):
            completed.add(trial_id)
            return None
        if error:
            state = TrialState.FAIL
            trial.set_user_attr("fail_reason", failure_reason(self._error_file(trial_id)))
        elif result is None or not result.get("final"):
            state = TrialState.PRUNED
            # Tune hands the result that made the scheduler stop the trial only to this
            # method; keep it as the last intermediate value (Optuna's value for a PRUNED trial).
            if result is not None and self.metric in result:
                with warnings.catch_warnings():  # Optuna ignores (and warns about) a step already reported
                    warnings.simplefilter("ignore")
                    trial.report(result[self.metric], result[TRAINING_ITERATION])
        else:
            return super().on_trial_complete(trial_id, result, error)
        searcher_study(self).tell(trial, state=state)
        completed.add(trial_id)

    def _error_file(self, trial_id: str) -> Path | None:
        """The trial's ``error.txt``: Tune writes it in the driver's staging folder for this fit
        (``<session>/artifacts/<fit time>/<experiment>/driver_artifacts/<trial>``) and copies it
        to the experiment folder later; the newest copy is the latest failure's."""
        experiment = Path(self.errors_dir)
        staged = ray_train_session_dir().glob(f"*/{experiment.name}/driver_artifacts/{trial_id}/error.txt")
        found = [path for path in (*staged, experiment / trial_id / "error.txt") if path.is_file()]
        return max(found, key=lambda path: path.stat().st_mtime, default=None)
