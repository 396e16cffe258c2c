"""Tune callbacks of a sweep (they run in the driver, inside Tune's controller): the console a
person follows (and `tune_output`, what Tune and Optuna themselves print meanwhile), the closing
of each trial's MLflow run however the trial ended, the detection of a study that has finished
while other studies still run, and, on a resumed sweep, the trials whose saved checkpoint is gone."""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState
from ray import tune
from ray.tune.experiment import Trial

from msa.platform.core.compat import forget_missing_checkpoint
from msa.platform.core.metrics import is_better
from msa.platform.core.run_dir import RunDir
from msa.platform.sweep.schedule import OUT_OF_TIME_ATTR, PAIR_KEY
from msa.platform.sweep.trial import without_pair
from msa.platform.sweep.warm_start import own_trials
from msa.platform.tracking.client import FAIL_REASON_TAG, STATE_TAG, client
from msa.platform.tracking.runs import TrialTracking, failure_reason, log_trial_outcome, open_trial_run
from msa.platform.training.config import resolve_config

LIVE = (Trial.PENDING, Trial.RUNNING, Trial.PAUSED)
QUIET_TUNE_ENV = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}


def trial_outcome(trial) -> str:
    """How Tune ended a trial that did not fail: ``complete`` on its natural last epoch (the
    training loop marks it ``final``), else ``pruned`` (the scheduler stopped it)."""
    return "complete" if (trial.last_result or {}).get("final") else "pruned"


@dataclass(frozen=True)
class PairPlan:
    """What the console and the study watcher know of a pair before it runs."""

    budget: int  # trials_per_pair
    metric: str  # the selection metric, e.g. ``mae``


class SweepConsole(tune.Callback):
    """What a sweep prints while it runs (Ray's own trial table is off unless asked for): one
    line per trial event (finished, pruned, failed, retried) and, every `every_s` seconds when
    something happened, one status line per pair."""

    def __init__(self, plans: dict[str, PairPlan], every_s: float = 30.0):
        self.plans, self.every_s = plans, every_s
        self.changed, self.last_status = True, 0.0

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        pair, result = trial.config[PAIR_KEY], trial.last_result or {}
        metric = self.plans[pair].metric
        value = result.get(f"best_valid_{metric}")
        how = "complete" if trial_outcome(trial) == "complete" else "pruned"
        score = "no valid score" if value is None else f"best valid {metric} {value:.4g}"
        self._event(pair, f"trial {trial.trial_id} {how} at epoch {result.get('epoch', 0):g}: {score}")

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self._event(trial.config[PAIR_KEY], f"trial {trial.trial_id} failed ({failure_reason(trial.error_file)}); "
                                            f"retrying from its last checkpoint")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._event(trial.config[PAIR_KEY], f"trial {trial.trial_id} failed after its retries: "
                                            f"{failure_reason(trial.error_file)}")

    def _event(self, pair: str, text: str) -> None:
        self.changed = True
        print(f"[{pair}] {text}", flush=True)

    def on_step_end(self, iteration, trials, **info) -> None:
        if self.changed and time.monotonic() - self.last_status >= self.every_s:
            self.changed, self.last_status = False, time.monotonic()
            print("\n".join(self.status_lines(trials)), flush=True)

    def status_lines(self, trials: list) -> list[str]:
        """One line per pair: trials done out of the budget, running, pruned, failed, best so far."""
        lines = []
        width = max(len(pair) for pair in self.plans)
        for pair, plan in self.plans.items():
            mine = [t for t in trials if t.config.get(PAIR_KEY) == pair]
            ended = [t for t in mine if t.status == Trial.TERMINATED]
            pruned = sum(trial_outcome(t) == "pruned" for t in ended)
            failed = sum(t.status == Trial.ERROR for t in mine)
            running = sum(t.status == Trial.RUNNING for t in mine)
            best = None
            for t in mine:
                value = (t.last_result or {}).get(f"best_valid_{plan.metric}")
                if value is not None and is_better(plan.metric, value, best):
                    best = value
            best_text = "-" if best is None else f"{best:.4g}"
            lines.append(f"[{pair:<{width}}] {len(ended) + failed}/{plan.budget} done ({pruned} pruned, {failed} failed), "
                         f"{running} running; best valid {plan.metric} {best_text}")
        return lines


@contextlib.contextmanager
def tune_output(verbose: int):
    """What Tune and Optuna print while the sweep runs: at `verbose` 0 only warnings, and no
    experiment box (Ray's new output engine prints one at every verbosity; the legacy engine,
    RAY_AIR_NEW_OUTPUT=0, honours verbosity 0) nor its warning about frequent experiment
    snapshots (every epoch, with one checkpoint kept per trial)."""
    if verbose:
        yield
        return
    saved_env = {key: os.environ.get(key) for key in QUIET_TUNE_ENV}
    saved_levels = (logging.getLogger("ray.tune").level, optuna.logging.get_verbosity())
    os.environ.update(QUIET_TUNE_ENV)
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        logging.getLogger("ray.tune").setLevel(saved_levels[0])
        optuna.logging.set_verbosity(saved_levels[1])


class TrialRunCloser(tune.Callback):
    """When Tune ends a trial, log its outcome to the trial's run (`tracking.runs`) and close it.

    The logging (test metrics, checkpoint files, a learning-curve plot: seconds per trial) runs
    through `submit`, the driver's closing thread, not in Tune's controller, which would hold
    every free slot meanwhile; the same thread closes studies afterwards, so a study's last trial
    is closed before the study. A restored Tune run gets a new closer (the saved one keeps no
    `submit`)."""

    def __init__(self, trackings: dict[str, TrialTracking], run_dir: RunDir, submit: Callable):
        self.trackings, self.run_dir, self.submit = trackings, run_dir, submit

    def __getstate__(self) -> dict:
        return {"trackings": self.trackings, "run_dir": self.run_dir}

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._close(trial, trial_outcome(trial))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._close(trial, "failed")

    def _close(self, trial, state: str) -> None:
        # What the close needs, read now: Tune goes on changing the trial.
        self.submit(self.close_run, trial.trial_id, dict(trial.config), state, trial.error_file)

    def close_run(self, trial_id: str, config: dict, state: str, error_file: str | None) -> None:
        tracking = self.trackings[config[PAIR_KEY]]
        mlflow_client = client(tracking.uri)
        folder = self.run_dir.trial(tracking.pair, trial_id)
        # A trial that failed before opening its run gets it here.
        run_id = open_trial_run(tracking, trial_id, resolve_config({**without_pair(config), "out": str(folder)},
                                                                   where=f"trial {trial_id} config"))
        closed_as = mlflow_client.get_run(run_id).data.tags.get(STATE_TAG)
        if closed_as is not None:  # closed before a driver was killed; Tune ran it again from its last checkpoint
            mlflow_client.set_terminated(run_id, status="FAILED" if closed_as == "failed" else "FINISHED")
            return
        if state == "failed":
            mlflow_client.set_tag(run_id, FAIL_REASON_TAG, failure_reason(error_file))
        log_trial_outcome(mlflow_client, run_id, folder, state)


def study_is_done(study: optuna.Study, budget: int) -> bool:
    """Every trial the study will get has finished: it holds its budget (or ran out of time)
    and none is still running (trials carried from earlier sweeps do not count)."""
    trials = own_trials(study)
    if any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials):
        return False
    return len(trials) >= budget or bool(study.user_attrs.get(OUT_OF_TIME_ATTR))


class StudyWatcher(tune.Callback):
    """Calls `on_done(pair)` once per pair, as soon as its study is done and Tune runs none of
    its trials, while the other pairs go on. `on_done` is the driver's (it closes and registers
    the study); a restored Tune run gets a new watcher, so the saved one keeps only its plans."""

    def __init__(self, plans: dict[str, PairPlan], run_dir: RunDir, on_done: Callable[[str], None],
                 closed: set[str], every_s: float = 2.0):
        self.plans, self.run_dir, self.on_done, self.every_s = plans, run_dir, on_done, every_s
        self.open = [pair for pair in plans if pair not in closed]
        self.last_check = 0.0
        self.studies: dict[str, optuna.Study] = {}  # loaded once: a storage costs a fraction of a second

    def __getstate__(self) -> dict:
        return {"plans": self.plans, "run_dir": self.run_dir}

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._check(trials, [trial.config[PAIR_KEY]], ending=trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._check(trials, [trial.config[PAIR_KEY]], ending=trial)

    def on_step_end(self, iteration, trials, **info) -> None:
        # A study can also end without a trial ending: its time budget ran out between trials
        # (so only a pair that has had a trial can).
        if time.monotonic() - self.last_check >= self.every_s:
            self.last_check = time.monotonic()
            self._check(trials, [pair for pair in self.open if any(t.config.get(PAIR_KEY) == pair for t in trials)])

    def _check(self, trials: list, pairs: list[str], ending=None) -> None:
        """`ending`: the trial Tune is ending now (its status changes after the callbacks)."""
        for pair in pairs:
            if pair not in self.open or any(t.config.get(PAIR_KEY) == pair and t.status in LIVE and t is not ending
                                            for t in trials):
                continue
            if pair not in self.studies:
                self.studies[pair] = optuna.load_study(study_name=pair, storage=self.run_dir.study_url(pair))
            if study_is_done(self.studies[pair], self.plans[pair].budget):
                self.open.remove(pair)
                self.on_done(pair)


class LostCheckpoints(tune.Callback):
    """On a resumed sweep, before any trial starts: an unfinished trial whose saved state names a
    checkpoint that a killed driver's Tune had already deleted starts over (see
    `forget_missing_checkpoint`) instead of failing on every retry. Training is seeded, so it
    trains the epochs it had trained again, identically; MLflow keeps each epoch once."""

    def __init__(self):
        self.checked = False

    def on_step_begin(self, iteration, trials, **info) -> None:
        if self.checked:
            return
        self.checked = True
        for trial in trials:
            if trial.status in LIVE and (path := forget_missing_checkpoint(trial)) is not None:
                print(f"[{trial.config[PAIR_KEY]}] trial {trial.trial_id}: its last checkpoint ({path}) was deleted "
                      f"before the stopped driver saved its state; it starts over", flush=True)
