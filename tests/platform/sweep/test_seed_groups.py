"""Seed groups in real sweeps (`budget.seeds_per_trial`): Ray Tune, Optuna, ASHA, DeepSpeed
trials and MLflow. What the searcher and the scheduler see is the seed mean; every seed's
checkpoint is kept, verified and registered (and the registered group serves its seed mean
where msa-sweep is not installed); a failing seed is retried with its group. All read off the
session's seed sweep (conftest.py). Elsewhere: a killed driver's sweep resuming with every group
whole and a time budget running out mid-group (test_driver.py), seed groups as ensemble members
(tests/ensembles/test_build.py), bad seed counts (test_bad_inputs.py)."""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
from clean_env import check_serves_like_msa_predict
from helpers import seed_histories, studies, trial_runs, versions_of
from optuna.trial import TrialState

from msa.platform.core.run_dir import RunDir
from msa.platform.data.readers import load_dataset
from msa.platform.tracking.registry import load_registered, predict_splits
from msa.platform.training.checkpoint import SeedGroup

PAIR, NAME = "baseline-seeded", "msa-baseline-seeded"


def best_so_far(history: list[dict[str, str]], epoch: int) -> float:
    """A seed's best valid MAE through `epoch` (a seed that stopped earlier keeps its last best)."""
    return min(float(row["valid_mae"]) for row in history if int(row["epoch"]) <= epoch)


def test_a_seed_group_sweep_searches_and_prunes_on_the_seed_mean_and_retries_a_failing_seed(
        seed_sweep, mlflow_client, clean_env, tmp_path):
    """3 trials of 2 seeds under ASHA; each trial's second seed raises at the start of epoch 2
    and the trial (the whole group) is retried from its last checkpoint, once. Tune hands the
    scheduler and the searcher the same result dicts, kept in each trial's result.json."""
    run_dir = seed_sweep.run_dir
    (row,) = seed_sweep.pairs
    (study,) = studies(run_dir).values()
    assert len(study.trials) == 3 and row.complete + row.pruned == 3 and row.failed == 0
    results = {}
    for trial in study.trials:
        trial_id = trial.user_attrs["ray_trial_id"]
        folder = RunDir(run_dir).trial(PAIR, trial_id)
        group = SeedGroup(folder)
        assert group.exists() and group.seeds == [3, 4]  # search.seed onwards, the same for every config
        assert len({c.metrics["weights_sha256"] for c in group.checkpoints}) == 2
        for checkpoint in group.checkpoints:
            checkpoint.verified_weights("test")
        histories = seed_histories(folder)
        # Optuna's intermediate values and Tune's results (what ASHA reads) are the seed mean.
        for epoch, value in trial.intermediate_values.items():
            assert value == pytest.approx(statistics.mean(best_so_far(h, epoch) for h in histories.values()), rel=1e-9)
        with (RunDir(run_dir).tune_experiment / trial_id / "result.json").open() as handle:
            reported = [json.loads(line) for line in handle]
        for result in reported:
            mean = statistics.mean(best_so_far(h, int(result["epoch"])) for h in histories.values())
            assert result["best_valid_mae"] == pytest.approx(mean, rel=1e-9)
            assert result["seed3_best_valid_mae"] == pytest.approx(best_so_far(histories[3], int(result["epoch"])))
        if trial.state == TrialState.COMPLETE:
            assert trial.value == pytest.approx(group.mean("valid")["mae"], rel=1e-9)
        epochs = [int(r["epoch"]) for r in reported]
        if max(epochs) >= 2:  # it met the fault (a group ASHA stopped after epoch 1 did not)
            error_log = (RunDir(run_dir).tune_experiment / trial_id / "error.txt").read_text()
            assert error_log.count("Failure #") == 1 and "raised at the start of epoch 2" in error_log
        results[trial_id] = (trial, group, epochs)
    assert any(max(epochs) >= 2 for _, _, epochs in results.values()), "no group met the fault"
    assert sum("failed (" in line and "retrying from its last checkpoint" in line for line in seed_sweep.console) \
        == sum(max(epochs) >= 2 for _, _, epochs in results.values())  # the console says so, once per retry

    runs = {r.data.tags["ray_trial_id"]: r for r in trial_runs(mlflow_client, run_dir)}
    assert len(runs) == 3
    for trial_id, (trial, group, epochs) in results.items():
        run = runs[trial_id]
        assert run.info.status == "FINISHED" and run.data.tags["seeds"] == "3,4" and run.data.params["seeds"] == "2"
        for name in ("best_valid_mae", "seed3_best_valid_mae", "seed4_best_valid_mae"):
            steps = sorted(m.step for m in mlflow_client.get_metric_history(run.info.run_id, name))
            assert steps == sorted(set(epochs)), (name, steps)  # each epoch once, across the retry
        assert run.data.metrics["test_mae"] == pytest.approx(group.mean("test")["mae"])
        assert run.data.metrics["seed4_test_mae"] == pytest.approx(group.scores("test")[1]["mae"])
        assert run.data.metrics["test_mae_sd"] == pytest.approx(group.sd("test")["mae"])
        artifacts = {a.path for a in mlflow_client.list_artifacts(run.info.run_id, "checkpoint")}
        assert artifacts == {"checkpoint/seed-3", "checkpoint/seed-4"}
    (version,) = versions_of(mlflow_client, NAME)
    assert version.tags["seeds"] == "3,4" and version.tags["ray_trial_id"] == Path(row.best_checkpoint).name
    best = SeedGroup(row.best_checkpoint)
    assert float(version.tags["valid_mae"]) == pytest.approx(best.mean("valid")["mae"])
    model = load_registered(f"models:/{NAME}@champion", mlflow_client.tracking_uri)
    predicted = predict_splits(model, load_dataset(seed_sweep.data["seeded"]), ["test"], what="seeded")["test"]
    # and so it does where msa-sweep is not installed
    check_serves_like_msa_predict(clean_env, f"models:/{NAME}@champion", mlflow_client.tracking_uri,
                                  seed_sweep.data["seeded"], cwd=tmp_path)
    stored = []
    for checkpoint in best.checkpoints:  # the registered model predicts its seeds' mean
        with (checkpoint.folder / "predictions_test.csv").open() as handle:
            stored.append([float(r["prediction"]) for r in csv.DictReader(handle)])
    assert predicted == pytest.approx(np.mean(stored, axis=0), rel=1e-5, abs=1e-6)
