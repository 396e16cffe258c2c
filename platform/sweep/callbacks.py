"""Tune callbacks of a sweep (they run in the driver, inside Tune's controller): the progress
line per finished trial, and the closing of each trial's MLflow run however the trial ended."""
from __future__ import annotations

from ray import tune

from msa.platform.core.metrics import is_better
from msa.platform.core.run_dir import RunDir
from msa.platform.tracking.client import FAIL_REASON_TAG, STATE_TAG, client
from msa.platform.tracking.runs import TrialTracking, failure_reason, log_trial_outcome, open_trial_run


def trial_outcome(trial) -> str:
    """How Tune ended a trial that did not fail: ``complete`` on its natural last epoch (the
    training loop marks it ``final``), else ``pruned`` (the scheduler stopped it)."""
    return "complete" if (trial.last_result or {}).get("final") else "pruned"


class PairProgress(tune.Callback):
    """Prints, per pair, trials done out of the budget and the best valid metric so far."""

    def __init__(self, pair: str, total: int, metric: str):
        self.pair, self.total, self.metric = pair, total, metric
        self.done, self.best = 0, None

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._count(trial, "complete" if trial_outcome(trial) == "complete" else "stopped early")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._count(trial, "failed")

    def _count(self, trial, how: str) -> None:
        self.done += 1
        value = (trial.last_result or {}).get(f"best_valid_{self.metric}")
        if value is not None and is_better(self.metric, value, self.best):
            self.best = value
        best = "-" if self.best is None else f"{self.best:.4g}"
        print(f"[{self.pair}] {self.done}/{self.total} trials finished ({trial.trial_id} {how}); "
              f"best valid {self.metric} so far: {best}", flush=True)


class TrialRunCloser(tune.Callback):
    """When Tune ends a trial, log its outcome to the trial's run (`tracking.runs`) and close it."""

    def __init__(self, tracking: TrialTracking, run_dir: RunDir):
        self.tracking, self.run_dir = tracking, run_dir

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._close(trial, trial_outcome(trial))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._close(trial, "failed")

    def _close(self, trial, state: str) -> None:
        mlflow_client = client(self.tracking.uri)
        folder = self.run_dir.trial(self.tracking.pair, trial.trial_id)
        run_id = open_trial_run(self.tracking, trial.trial_id, {**trial.config, "out": str(folder)})  # a trial that failed before opening it
        closed_as = mlflow_client.get_run(run_id).data.tags.get(STATE_TAG)
        if closed_as is not None:  # closed before a driver was killed; Tune ran it again from its last checkpoint
            mlflow_client.set_terminated(run_id, status="FAILED" if closed_as == "failed" else "FINISHED")
            return
        if state == "failed":
            mlflow_client.set_tag(run_id, FAIL_REASON_TAG, failure_reason(trial.error_file))
        log_trial_outcome(mlflow_client, run_id, folder, state)
