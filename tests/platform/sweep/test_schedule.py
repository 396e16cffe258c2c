"""The matrix schedule: which pair gets a free slot, one Optuna study per pair behind one
searcher, one ASHA per pair. Real Optuna studies (SQLite) and real Tune trial and ASHA objects;
no Ray runtime is needed (the controller is not involved)."""
from __future__ import annotations

import optuna
import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import Searcher

from msa.platform.sweep.schedule import PAIR_KEY, MatrixSearch, PairLoad, PairScheduler, next_pair, pair_scheduler
from msa.platform.sweep.searcher import PruningAwareOptunaSearch

A, B, C = "baseline-a", "baseline-b", "tfn-a"


@pytest.mark.parametrize("loads, schedule, cap, expected", [
    ([PairLoad(A, 2, False), PairLoad(B, 0, False)], "concurrent", None, A),  # the first pair first
    ([PairLoad(A, 2, False), PairLoad(B, 0, False)], "concurrent", 2, B),  # A at its cap
    ([PairLoad(A, 2, True), PairLoad(B, 1, False)], "concurrent", None, B),  # A has no trials left
    ([PairLoad(A, 2, True), PairLoad(B, 1, True)], "concurrent", None, None),  # nothing left to start
    ([PairLoad(A, 1, True), PairLoad(B, 0, False)], "sequential", None, None),  # A's last trial still runs
    ([PairLoad(A, 0, True), PairLoad(B, 0, False)], "sequential", None, B),
    ([PairLoad(A, 2, False), PairLoad(B, 0, False)], "sequential", 2, None),  # A at its cap: B still waits
])
def test_a_free_slot_goes_to_the_first_pair_with_work_under_its_cap(loads, schedule, cap, expected):
    assert next_pair(loads, schedule=schedule, max_per_pair=cap) == expected


def matrix_search(tmp_path, budget: int, **options) -> MatrixSearch:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    searchers = {
        pair: PruningAwareOptunaSearch(
            space={"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}, metric="best_valid_mae",
            mode="min", sampler=optuna.samplers.RandomSampler(seed=0), study_name=pair,
            storage=optuna.storages.RDBStorage(f"sqlite:///{tmp_path / pair}.db"), errors_dir=str(tmp_path),
            budget=budget)
        for pair in (A, B)
    }
    configs = {A: {"model": "baseline", "data": "a"}, B: {"model": "baseline", "data": "b"}}
    return MatrixSearch(searchers, configs, **{"schedule": "concurrent", "max_per_pair": None, "time_budget_s": None,
                                               **options})


def finish(search: MatrixSearch, trial_id: str, value: float) -> None:
    search.on_trial_complete(trial_id, {"best_valid_mae": value, "epoch": 1, "training_iteration": 1, "final": 1.0})


def test_the_matrix_searcher_keeps_each_pairs_budget_and_config_and_caps_each_pair(tmp_path):
    search = matrix_search(tmp_path, budget=2, max_per_pair=1)
    first, second = search.suggest("t1"), search.suggest("t2")
    assert (first[PAIR_KEY], first["data"], second[PAIR_KEY], second["data"]) == (A, "a", B, "b")
    assert "lr" in first and search.suggest("t3") is None  # both pairs at their cap of one
    finish(search, "t1", 0.5)
    assert search.suggest("t3")[PAIR_KEY] == A  # the slot A freed goes back to A, which has work
    finish(search, "t3", 0.4)
    assert search.suggest("t4") is None  # A's budget is spent, B is at its cap
    finish(search, "t2", 0.7)
    assert search.suggest("t4")[PAIR_KEY] == B
    assert search.suggest("t5") is None  # B at its cap again
    finish(search, "t4", 0.6)
    assert search.suggest("t5") == Searcher.FINISHED  # both studies hold their budget
    counts = {pair: len(optuna.load_study(study_name=pair, storage=f"sqlite:///{tmp_path / pair}.db").trials)
              for pair in (A, B)}
    assert counts == {A: 2, B: 2}


def test_a_pair_out_of_time_starts_no_trial_and_its_study_records_it(tmp_path):
    search = matrix_search(tmp_path, budget=5, time_budget_s=0.0)
    assert search.suggest("t1")[PAIR_KEY] == A
    # A's budget started with its first trial and is spent at once: every later slot goes to B.
    assert search.suggest("t2")[PAIR_KEY] == B
    study = optuna.load_study(study_name=A, storage=f"sqlite:///{tmp_path / A}.db")
    assert study.user_attrs["out_of_time"] is True and len(study.trials) == 1


def tune_trial(pair: str) -> Trial:
    return Trial("run_trial", config={PAIR_KEY: pair}, stub=True)


def test_asha_in_seconds_judges_trials_by_their_training_seconds_not_their_epochs():
    """With `budget_unit: seconds` the first rung is at the grace period in training seconds: a
    cheap config (1 s an epoch) is judged after its 10th epoch, a dear one (10 s an epoch) after
    its first; both are stopped at the maximum in seconds, whatever their epoch."""
    asha = pair_scheduler("asha", metric="best_valid_mae", mode="min", unit="seconds", max_t=40, grace_period=10,
                          reduction_factor=2)
    dear, cheap, weak = tune_trial(A), tune_trial(A), tune_trial(A)
    for trial in (dear, cheap, weak):
        asha.on_trial_add(None, trial)
    assert asha.on_trial_result(None, dear, {"epoch": 1, "time_total_s": 10.0, "best_valid_mae": 0.5}) == TrialScheduler.CONTINUE
    for epoch in range(1, 10):  # below the first rung: never judged
        assert asha.on_trial_result(None, cheap, {"epoch": epoch, "time_total_s": float(epoch), "best_valid_mae": 0.9}) \
            == TrialScheduler.CONTINUE
    # Its 10th epoch reaches the rung, where the dear trial's 0.5 beats its 0.9 (half of them go on).
    assert asha.on_trial_result(None, cheap, {"epoch": 10, "time_total_s": 10.0, "best_valid_mae": 0.9}) == TrialScheduler.STOP
    assert asha.on_trial_result(None, weak, {"epoch": 40, "time_total_s": 9.9, "best_valid_mae": 0.4}) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, dear, {"epoch": 4, "time_total_s": 40.0, "best_valid_mae": 0.3}) == TrialScheduler.STOP


def test_asha_of_one_pair_never_compares_its_trials_with_another_pairs():
    """Pair B's trials score far worse than A's. Under one ASHA, B's first trial would be stopped
    at the first rung; per pair, it is the first of its own rung and goes on, and each pair's
    rungs hold only its own trials."""
    schedulers = {pair: pair_scheduler("asha", metric="best_valid_mae", mode="min", unit="epochs", max_t=4, grace_period=1,
                                       reduction_factor=2) for pair in (A, B)}
    scheduler = PairScheduler(schedulers)
    a_trials, b_trial = [tune_trial(A) for _ in range(3)], tune_trial(B)
    for trial in [*a_trials, b_trial]:
        scheduler.on_trial_add(None, trial)
    for value, trial in zip((0.1, 0.2, 0.15), a_trials):
        scheduler.on_trial_result(None, trial, {"epoch": 1, "best_valid_mae": value})
    assert scheduler.on_trial_result(None, b_trial, {"epoch": 1, "best_valid_mae": 9.0}) == TrialScheduler.CONTINUE
    # The same result under a single ASHA over all four trials is stopped:
    single = pair_scheduler("asha", metric="best_valid_mae", mode="min", unit="epochs", max_t=4, grace_period=1, reduction_factor=2)
    for trial in [*a_trials, b_trial]:
        single.on_trial_add(None, trial)
    for value, trial in zip((0.1, 0.2, 0.15), a_trials):
        single.on_trial_result(None, trial, {"epoch": 1, "best_valid_mae": value})
    assert single.on_trial_result(None, b_trial, {"epoch": 1, "best_valid_mae": 9.0}) == TrialScheduler.STOP

    for pair, own in ((A, {t.trial_id for t in a_trials}), (B, {b_trial.trial_id})):
        recorded = {trial_id for bracket in schedulers[pair]._brackets for _, rung in bracket._rungs for trial_id in rung}
        assert recorded == own
