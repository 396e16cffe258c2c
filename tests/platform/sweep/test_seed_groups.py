"""Seed groups in real sweeps (`budget.seeds_per_trial`): Ray Tune, Optuna, ASHA, DeepSpeed
trials and MLflow. What the searcher and the scheduler see is the seed mean; every seed's
checkpoint is kept, verified and registered (and the registered group serves its seed mean
where msa-sweep is not installed); a failing seed is retried with its group; a
killed driver's sweep resumes with every group whole."""
from __future__ import annotations

import csv
import json
import signal
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from clean_env import check_serves_like_msa_predict
from optuna.trial import TrialState

from msa.platform.core.run_dir import RunDir
from msa.platform.data.readers import load_dataset
from msa.platform.sweep.config import load_sweep_config
from msa.platform.sweep.driver import run_sweep
from msa.platform.tracking.registry import load_registered, predict_splits
from msa.platform.training.checkpoint import SeedGroup
from tests.platform.sweep.test_driver import MSA, studies, trial_runs, write_config


def seed_histories(folder: Path) -> dict[int, list[dict[str, str]]]:
    """Each seed's history.csv of a seed group folder."""
    group = SeedGroup(folder)
    return {seed: checkpoint.history() for seed, checkpoint in zip(group.seeds, group.checkpoints)}


def best_so_far(history: list[dict[str, str]], epoch: int) -> float:
    """A seed's best valid MAE through `epoch` (a seed that stopped earlier keeps its last best)."""
    return min(float(row["valid_mae"]) for row in history if int(row["epoch"]) <= epoch)


def test_a_seed_group_sweep_searches_and_prunes_on_the_seed_mean_and_retries_a_failing_seed(
        ray_runtime, tmp_path, tracking_store, clean_env):
    """3 trials of 2 seeds under ASHA; each trial's second seed raises at the start of epoch 2
    and the trial (the whole group) is retried from its last checkpoint, once. Tune hands the
    scheduler and the searcher the same result dicts, kept in each trial's result.json."""
    config = load_sweep_config(write_config(
        tmp_path, name="seeds", datasets=["synth_regression"], models=["baseline"],
        train={"patience": 5, "inject_fault": "raise", "inject_fault_epoch": 2},
        budget={"trials_per_pair": 3, "seeds_per_trial": 2, "max_epochs": 3},
        search={"sampler": "random", "seed": 3, "scheduler": "asha", "grace_period": 1, "reduction_factor": 2},
        resources={"workers_per_trial": 1, "max_concurrent_trials": 2, "max_failures": 1},
    ))
    (row,) = run_sweep(config).pairs
    (run_dir,) = (tmp_path / "sweeps").glob("seeds-*")
    (study,) = studies(run_dir).values()
    assert len(study.trials) == 3 and row.complete + row.pruned == 3 and row.failed == 0
    results = {}
    for trial in study.trials:
        trial_id = trial.user_attrs["ray_trial_id"]
        folder = RunDir(run_dir).trial("baseline-synth_regression", trial_id)
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

    with tracking_store(run_dir) as mlflow_client:
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
        (version,) = mlflow_client.search_model_versions("name = 'msa-baseline-synth_regression'")
        assert version.tags["seeds"] == "3,4" and version.tags["ray_trial_id"] == Path(row.best_checkpoint).name
        best = SeedGroup(row.best_checkpoint)
        assert float(version.tags["valid_mae"]) == pytest.approx(best.mean("valid")["mae"])
        model = load_registered("models:/msa-baseline-synth_regression@champion", mlflow_client.tracking_uri)
        dataset = load_dataset(RunDir(run_dir).builtin_dataset("synth_regression"))
        predicted = predict_splits(model, dataset, ["test"], what="synth")["test"]
        # and so it does where msa-sweep is not installed
        check_serves_like_msa_predict(clean_env, "models:/msa-baseline-synth_regression@champion",
                                      mlflow_client.tracking_uri, RunDir(run_dir).builtin_dataset("synth_regression"),
                                      cwd=tmp_path)
    stored = []
    for checkpoint in best.checkpoints:  # the registered model predicts its seeds' mean
        with (checkpoint.folder / "predictions_test.csv").open() as handle:
            stored.append([float(r["prediction"]) for r in csv.DictReader(handle)])
    assert predicted == pytest.approx(np.mean(stored, axis=0), rel=1e-5, abs=1e-6)


def test_a_killed_sweep_resumes_with_every_seed_group_whole(tmp_path, tracking_store):
    """The driver is SIGKILLed while the second group trains; the resumed sweep continues that
    group from its checkpoint (both seeds at the same epoch) and does not run the first again:
    every seed has each epoch once, and the first group's checkpoints are untouched."""
    config = write_config(
        tmp_path, datasets=["synth_regression"], models=["baseline"],
        budget={"trials_per_pair": 2, "seeds_per_trial": 2, "max_epochs": 5}, search={"scheduler": "none", "seed": 0},
        train={"patience": 10}, resources={"workers_per_trial": 1, "max_concurrent_trials": 1},
    )
    driver = subprocess.Popen([MSA, "sweep", str(config)], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    deadline, first = time.time() + 300, None
    while time.time() < deadline and driver.poll() is None:
        time.sleep(0.5)
        run_dirs = list((tmp_path / "sweeps").glob("t-*"))
        folders = sorted(run_dirs[0].glob("trials/*/*"), key=lambda p: p.stat().st_mtime) if run_dirs else []
        if len(folders) == 2 and SeedGroup(folders[1]).checkpoints[-1].exists():
            histories = seed_histories(folders[1])
            if min(int(checkpoint.metrics["best_epoch"]) for checkpoint in SeedGroup(folders[1]).checkpoints) >= 2 \
                    and all(histories.values()):
                first = folders[0]
                driver.send_signal(signal.SIGKILL)
                break
    driver.communicate(timeout=60)
    assert first is not None and SeedGroup(first).exists(), "the sweep never reached its second group"
    (run_dir,) = (tmp_path / "sweeps").glob("t-*")
    first_mtimes = {c.folder.name: (c.folder / "metrics.json").stat().st_mtime for c in SeedGroup(first).checkpoints}
    time.sleep(3)  # the tracking server's guard notices its driver is gone
    resumed = subprocess.run([MSA, "sweep", "--resume", str(run_dir)], cwd=tmp_path, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    (study,) = studies(run_dir).values()
    assert len(study.trials) == 2 and {t.state for t in study.trials} == {TrialState.COMPLETE}
    assert {c.folder.name: (c.folder / "metrics.json").stat().st_mtime for c in SeedGroup(first).checkpoints} \
        == first_mtimes  # not run again
    with tracking_store(run_dir) as mlflow_client:
        runs = {r.data.tags["ray_trial_id"]: r for r in trial_runs(mlflow_client, run_dir)}
        for trial in study.trials:
            trial_id = trial.user_attrs["ray_trial_id"]
            group = SeedGroup(RunDir(run_dir).trial("baseline-synth_regression", trial_id))
            assert group.exists() and group.seeds == [0, 1]
            for seed in group.seeds:
                steps = [m.step for m in mlflow_client.get_metric_history(runs[trial_id].info.run_id,
                                                                          f"seed{seed}_valid_mae")]
                assert sorted(steps) == [1, 2, 3, 4, 5], (trial_id, seed, steps)
            for history in seed_histories(group.folder).values():
                assert [int(r["epoch"]) for r in history] == [1, 2, 3, 4, 5]
            assert runs[trial_id].info.status == "FINISHED"


def test_a_time_budget_that_runs_out_mid_group_lets_the_group_finish_whole(ray_runtime, tmp_path):
    """`time_budget_s` stops groups from starting, never a running one: the 1 s budget runs out
    while the first group trains, and that group still trains both its seeds to the end."""
    config = load_sweep_config(write_config(
        tmp_path, name="timed", datasets=["synth_regression"], models=["baseline"],
        budget={"trials_per_pair": 4, "seeds_per_trial": 2, "max_epochs": 3, "time_budget_s": 1.0},
        search={"scheduler": "none"}, train={"patience": 10},
        resources={"workers_per_trial": 1, "max_concurrent_trials": 1},
    ))
    (row,) = run_sweep(config).pairs
    (run_dir,) = (tmp_path / "sweeps").glob("timed-*")
    (study,) = studies(run_dir).values()
    assert (row.trials, row.complete) == (1, 1) and study.user_attrs["out_of_time"] is True
    group = SeedGroup(row.best_checkpoint)
    assert group.exists() and group.seeds == [0, 1]
    assert [[int(r["epoch"]) for r in history] for history in seed_histories(group.folder).values()] == [[1, 2, 3]] * 2


@pytest.mark.parametrize("overrides, message", [
    (["budget.seeds_per_trial=0"], "budget.seeds_per_trial must be >= 1, got 0"),
    (["budget.seeds_per_trial=-2"], "budget.seeds_per_trial must be >= 1, got -2"),
])
def test_bad_seed_counts_are_one_line_errors(tmp_path, overrides, message):
    config = write_config(tmp_path, datasets=["synth_regression"], models=["baseline"])
    result = subprocess.run([MSA, "sweep", str(config), *overrides], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "sweeps").exists()
