"""One Tune run for a sweep's whole (model, dataset) matrix. Runs in the driver, inside Tune's
controller.

`MatrixSearch` holds one `PruningAwareOptunaSearch` per pair (its own TPE state, SQLite study
and budget) and hands each trial slot Tune offers to a pair chosen by `next_pair`; Tune's
`ConcurrencyLimiter` around it caps the trials running in all pairs together. `PairScheduler`
holds one ASHA (or FIFO) scheduler per pair, so a pair's trials are only ever compared with
each other. Every trial's config carries its pair under `PAIR_KEY`; the trainable strips it.

Why one Tune run rather than one per pair driven concurrently: one controller owns the slots,
so a slot freed by any study is offered at once to the next pair with work, the global cap is
Tune's own, and one saved experiment state restores every pair together.
"""
from __future__ import annotations

import pickle
import time
from dataclasses import dataclass
from typing import Literal

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.utils.util import merge_dicts

from msa.platform.core.compat import searcher_study
from msa.platform.sweep.searcher import PruningAwareOptunaSearch

PAIR_KEY = "msa_pair"  # in every trial's config: the (model, dataset) study it belongs to
OUT_OF_TIME_ATTR = "out_of_time"  # study user attribute: budget.time_budget_s ran out, no more trials


@dataclass(frozen=True)
class PairLoad:
    """What `next_pair` needs to know of one pair at a moment."""

    pair: str
    running: int  # its trials holding a slot (or waiting for one)
    exhausted: bool  # its searcher will suggest no more (budget reached or out of time)


def next_pair(loads: list[PairLoad], *, schedule: Literal["concurrent", "sequential"],
              max_per_pair: int | None) -> str | None:
    """The pair that gets a free trial slot: None when no pair may take one now.

    ``concurrent``: the first pair (in the sweep's order) that has trials left and is under
    its cap, so the first studies finish (and register) as early as they would alone while
    the slots they cannot use go to the next ones. ``sequential``: only the first pair not yet
    finished, as separate Tune runs one after another would do.
    """
    for load in loads:
        if load.exhausted:
            if schedule == "sequential" and load.running:
                return None  # its last trials still run: the next study waits
            continue
        if max_per_pair is None or load.running < max_per_pair:
            return load.pair
        if schedule == "sequential":
            return None
    return None


class MatrixSearch(Searcher):
    """Multiplexes one `PruningAwareOptunaSearch` per pair over one Tune run.

    Args:
        searchers: per pair, in the sweep's order.
        configs: per pair, the trial config Optuna's suggestion is merged into.
        schedule, max_per_pair: see `next_pair`.
        time_budget_s: per pair, counted from its first trial in this driver: no trial of the
            pair starts later (the ones running finish, as Optuna's own ``timeout`` does).
    """

    def __init__(self, searchers: dict[str, PruningAwareOptunaSearch], configs: dict[str, dict], *,
                 schedule: Literal["concurrent", "sequential"], max_per_pair: int | None, time_budget_s: float | None):
        super().__init__(metric=None, mode=None)
        self.studies, self.configs = searchers, configs
        self.schedule, self.max_per_pair, self.time_budget_s = schedule, max_per_pair, time_budget_s
        self.live: dict[str, str] = {}  # Ray trial id -> pair, for trials not yet completed
        self.exhausted: set[str] = set()
        self.started_at: dict[str, float] = {}  # per pair, monotonic; not saved (counted per driver)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # every pair's searcher has its own metric and mode

    def suggest(self, trial_id: str) -> dict | str | None:
        while True:
            self._expire_out_of_time()
            if len(self.exhausted) == len(self.studies):
                return Searcher.FINISHED
            running = {pair: 0 for pair in self.studies}
            for pair in self.live.values():
                running[pair] += 1
            loads = [PairLoad(pair, running[pair], pair in self.exhausted) for pair in self.studies]
            pair = next_pair(loads, schedule=self.schedule, max_per_pair=self.max_per_pair)
            if pair is None:
                return None
            suggestion = self.studies[pair].suggest(trial_id)
            if suggestion in (None, Searcher.FINISHED):
                self.exhausted.add(pair)  # the study holds its budget
                continue
            self.started_at.setdefault(pair, time.monotonic())
            self.live[trial_id] = pair
            return {**merge_dicts(self.configs[pair], suggestion), PAIR_KEY: pair}

    def _expire_out_of_time(self) -> None:
        if self.time_budget_s is None:
            return
        for pair, started in self.started_at.items():
            if pair not in self.exhausted and time.monotonic() - started >= self.time_budget_s:
                self.exhausted.add(pair)
                searcher_study(self.studies[pair]).set_user_attr(OUT_OF_TIME_ATTR, True)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.live:
            self.studies[self.live[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pair = self.live.pop(trial_id, None)
        if pair is not None:
            self.studies[pair].on_trial_complete(trial_id, result, error)

    def save(self, checkpoint_path: str) -> None:
        state = {key: value for key, value in self.__dict__.items() if key not in ("started_at", "exhausted")}
        with open(checkpoint_path, "wb") as handle:
            pickle.dump(state, handle)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as handle:
            self.__dict__.update(pickle.load(handle))
        # Counted again: a pair whose study is full says so at its next suggest; an earlier
        # driver's time budget that ran out is recorded in its study.
        self.started_at, self.exhausted = {}, {
            pair for pair, searcher in self.studies.items() if searcher_study(searcher).user_attrs.get(OUT_OF_TIME_ATTR)}


class PairScheduler(FIFOScheduler):
    """One trial scheduler per pair (ASHA, or FIFO for ``search.scheduler: none``); each trial's
    results go to its own pair's scheduler only. Trials start in the order Tune queued them."""

    def __init__(self, schedulers: dict[str, TrialScheduler]):
        super().__init__()
        self.schedulers = schedulers

    def _of(self, trial) -> TrialScheduler:
        return self.schedulers[trial.config[PAIR_KEY]]

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # every pair's scheduler has its own metric and mode

    def on_trial_add(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        return self._of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "\n".join(f"{pair}: {scheduler.debug_string()}" for pair, scheduler in self.schedulers.items())


def pair_scheduler(kind: Literal["asha", "none"], *, metric: str, mode: str, unit: Literal["epochs", "seconds"],
                   max_t: float, grace_period: int, reduction_factor: int) -> TrialScheduler:
    """One pair's scheduler; `metric` is what its trials report (``best_valid_<metric>``), `unit`
    what ASHA's rungs, `grace_period` and `max_t` count: a trial's epochs, or its training
    seconds (Tune's ``time_total_s``, which counts the first epoch's set-up in)."""
    if kind == "none":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="epoch" if unit == "epochs" else "time_total_s", metric=metric, mode=mode,
                         max_t=max_t, grace_period=grace_period, reduction_factor=reduction_factor)
