"""Real sweeps: Ray Tune + Optuna over trials running DeepSpeed on the CPU.

The matrix schedule and ASHA are read off the session's reference sweep (conftest.py). The
interrupt/resume and Ctrl-C tests drive the `msa` console script (its own Ray and MLflow server:
stopping the driver is what they test). The fault tests run their own small sweeps on the
session's Ray and MLflow server, each on a data file named after it (its registered names are its
own), except the one that crashes its tracking server."""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    finished_mtimes,
    interrupt_until_it_returns,
    processes_under,
    reap_orphaned_ray_agents,
    saved_checkpoints,
    seed_histories,
    stop_when_finished,
    store_client,
    studies,
    sweep_config,
    sweep_yaml,
    synth_data,
    trial_runs,
    versions_of,
)
from optuna.trial import TrialState

from msa.platform.core.config import to_plain
from msa.platform.core.errors import MsaError
from msa.platform.core.run_dir import RunDir
from msa.platform.data.synth import synthesize
from msa.platform.sweep.config import load_sweep_config
from msa.platform.sweep.driver import run_sweep, trial_param_space
from msa.platform.sweep.search_space import load_search_space
from msa.platform.training.checkpoint import Checkpoint, SeedGroup
from msa.platform.training.config import SWEEP_OWNED, TrainConfig, resolve_config
from msa.platform.training.loop import train_loop
from msa.platform.training.text_encoder import load_encoder

REFERENCE_PAIRS = ["baseline-synth_regression", "baseline-synth_classification", "tfn-synth_regression",
                   "tfn-synth_classification"]


def test_interrupted_then_killed_sweep_resumes_without_rerunning_or_losing_trials(ray_driver, tmp_path):
    """Two studies running at once (one trial each, two slots), each trial a group of 2 seeds.
    Ctrl-C, resume, SIGKILL of the driver while a group trains, resume: every trial finished
    before each stop is kept once (Optuna, Ray, MLflow) and never run again, every seed of every
    group has each epoch once; each study ends with exactly its budget of 3 and is registered
    once. The killed driver's saved state is then made to name a checkpoint Tune had deleted, as
    a kill in the moment between Tune deleting a trial's previous checkpoint and saving its state
    leaves it (once seen in CI as a FAIL trial after the resume): that trial starts over instead.
    The drivers run with cloud credentials in their environment: they reach no file of the run.
    (Its own drivers and their own MLflow servers: stopping them is the test.)"""
    secret = secrets.token_hex(20)
    env = {**ray_driver.env, "AWS_SECRET_ACCESS_KEY": secret, "AWS_ACCESS_KEY_ID": "AKIA" + secret[:16].upper(),
           "MLFLOW_TRACKING_TOKEN": secret}
    config = sweep_yaml(tmp_path, models=["baseline", "tfn"], budget={"trials_per_pair": 3, "seeds_per_trial": 2, "max_epochs": 3},
                        search={"seed": 1}, resources={"max_concurrent_trials": 2, "max_trials_per_pair": 1})
    run_dirs = lambda: (tmp_path / "sweeps").glob("t-*")  # noqa: E731
    process = ray_driver.start("sweep", str(config), cwd=tmp_path, env=env)
    run_dir = stop_when_finished(process, run_dirs, 2, signal.SIGINT)
    output = process.communicate(timeout=240)[0]
    assert process.returncode == 130, output[-3000:]
    assert "msa sweep --resume" in output
    before_interrupt = finished_mtimes(run_dir)
    assert 2 <= len(before_interrupt) < 6
    mlflow_client = store_client(run_dir)  # the interrupted sweep's open runs were ended
    experiment = mlflow_client.get_experiment_by_name(run_dir.name)
    statuses = {(r.data.tags["msa.role"], r.data.tags.get("msa.study_closed")): r.info.status for r in
                mlflow_client.search_runs([experiment.experiment_id], filter_string="tags.`msa.role` != 'trial'")}
    assert statuses[("sweep", None)] == "KILLED"
    assert {status for (role, closed), status in statuses.items() if role == "study"} <= {"KILLED", "FINISHED"}
    assert all(closed == "true" for (role, closed), status in statuses.items() if status == "FINISHED")

    process = ray_driver.start("sweep", "--resume", str(run_dir), cwd=tmp_path, env=env)
    stop_when_finished(process, run_dirs, len(before_interrupt) + 2, signal.SIGKILL, until=saved_checkpoints)
    process.communicate(timeout=60)
    before_kill = finished_mtimes(run_dir)
    assert len(before_kill) < 6
    time.sleep(3)  # the tracking server's guard notices its driver is gone within a second
    assert not subprocess.run(["pgrep", "-f", f"{run_dir}/mlflow/mlflow.db"], capture_output=True).stdout
    reap_orphaned_ray_agents()
    lost_trial, lost = next(iter(saved_checkpoints(run_dir).items()))
    shutil.rmtree(lost)

    resumed = ray_driver.run("sweep", "--resume", str(run_dir), cwd=tmp_path, env=env, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"trial {lost_trial}: its last checkpoint ({lost}) was deleted" in resumed.stdout
    ray_ids = []
    assert set(studies(run_dir)) == {"baseline-synth_regression", "tfn-synth_regression"}
    for study in studies(run_dir).values():
        ray_ids += [t.user_attrs["ray_trial_id"] for t in study.trials]
        assert len(study.trials) == 3
        assert all(t.state == TrialState.COMPLETE for t in study.trials), [(t.number, t.state, t.user_attrs) for t in study.trials]
    assert len(set(ray_ids)) == 6
    after = finished_mtimes(run_dir)
    for trial_id, mtimes in {**before_interrupt, **before_kill}.items():  # finished before a stop: not run again
        assert after[trial_id] == mtimes
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [(row["trials"], row["complete"]) for row in summary] == [(3, 3), (3, 3)]
    # Ray's own record of each trial. Not asserted for trials finished under the killed driver:
    # Tune copies a trial's results from the driver's staging folder to storage every ~10 s, so
    # one that finished in the last seconds before a SIGKILL has none (docs/reliability.md).
    for trial_id in [*before_interrupt, *(i for i in ray_ids if i not in before_kill)]:
        assert (RunDir(run_dir).tune_experiment / trial_id / "result.json").is_file()
    folders = {t.user_attrs["ray_trial_id"]: RunDir(run_dir).trial(pair, t.user_attrs["ray_trial_id"])
               for pair, study in studies(run_dir).items() for t in study.trials}
    for folder in folders.values():  # every group whole: both seeds, each epoch once
        assert SeedGroup(folder).exists() and SeedGroup(folder).seeds == [1, 2]
        assert [[int(r["epoch"]) for r in history] for history in seed_histories(folder).values()] == [[1, 2, 3]] * 2
    runs = {r.data.tags["ray_trial_id"]: r for r in trial_runs(mlflow_client, run_dir)}  # each trial one run,
    # continued across stops. A trial the killed driver had started but not yet saved in Tune's
    # state went on under a new Ray id; its first run is closed KILLED.
    assert {i: r.info.status for i, r in runs.items() if i not in ray_ids} in ({}, {i: "KILLED" for i in runs if i not in ray_ids})
    assert {runs[i].info.status for i in ray_ids} == {"FINISHED"}
    for run in (runs[i] for i in ray_ids):
        for name in ("valid_mae", "seed1_valid_mae", "seed2_valid_mae"):
            steps = sorted(m.step for m in mlflow_client.get_metric_history(run.info.run_id, name))
            assert steps == [1, 2, 3], (run.data.tags["ray_trial_id"], name, steps)
        assert len(mlflow_client.get_metric_history(run.info.run_id, "test_mae")) == 1  # closed once
    for name in ("msa-baseline-synth_regression", "msa-tfn-synth_regression"):  # each study registered once
        versions = versions_of(mlflow_client, name)
        assert len(versions) == 1
        assert versions[0].tags["seeds"] == "1,2"  # a whole group
    files = [p for p in run_dir.rglob("*") if p.is_file()]  # MLflow's SQLite store and artifacts included
    assert any(p.name == "mlflow.db" for p in files) and any(p.name == "model.pt" for p in files)
    leaking = [str(p.relative_to(run_dir)) for p in files
               if secret.encode() in p.read_bytes() or secret[:16].upper().encode() in p.read_bytes()]
    assert leaking == []


# Moments of a sweep's start-up at which Ctrl-C comes: its run directory made, its own MLflow
# server launched (booting while Ray starts), the server answering (the sweep run opens).
SWEEP_MOMENTS = {
    "run directory made": lambda tmp_path, out: any((tmp_path / "sweeps").glob("t-*/sweep.yaml")),
    "server launched": lambda tmp_path, out: any((tmp_path / "sweeps").glob("t-*/mlflow/server.log")),
    "server answering": lambda tmp_path, out: "MLflow: experiment" in out.read_text(),
}


@pytest.mark.parametrize("command, moment", [*(("sweep", m) for m in SWEEP_MOMENTS), ("run", "server launched")])
def test_ctrl_c_at_any_moment_of_a_sweeps_start_leaves_no_mlflow_server(ray_driver, tmp_path, command, moment):
    # Its own driver and server: the command's Ctrl-C, and the server it starts, are what it tests.
    config = sweep_yaml(tmp_path, budget={"trials_per_pair": 2})
    out = tmp_path / "out.txt"
    with out.open("w") as handle:
        process = ray_driver.start(command, str(config), cwd=tmp_path, stdout=handle)
    try:
        deadline = time.time() + 180
        while not SWEEP_MOMENTS[moment](tmp_path, out):
            assert time.time() < deadline and process.poll() is None, out.read_text()[-3000:]
            time.sleep(0.05)
    finally:
        interrupt_until_it_returns(process)
    assert process.returncode == 130, out.read_text()[-3000:]
    assert processes_under(tmp_path, "mlflow") == [], "the sweep's MLflow server must stop with the command"


def test_resume_refuses_a_different_config(tmp_path):
    from msa.platform.cli import main

    config = sweep_yaml(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "sweep.yaml").write_text(yaml.safe_dump(to_plain(load_sweep_config(config))))
    assert main(["sweep", "--resume", str(run_dir), str(config), "budget.trials_per_pair=3"]) == 2


def test_every_trial_gets_each_sweep_owned_key_from_the_sweep(demo_path):
    """The keys a search space and a `train:` section may not name are exactly those the sweep
    sets for every trial (``out``: the trial's folder, set by the trial itself)."""
    config = load_sweep_config(demo_path, ["train.patience=5"])
    dataset = synthesize("regression", seed=0, sizes={"train": 8, "valid": 4, "test": 4})
    params = trial_param_space(config, load_search_space("baseline"), "baseline", dataset, "mae")
    owned = {key for key in params if key in SWEEP_OWNED}
    assert owned | {"out"} == set(SWEEP_OWNED)
    assert params["patience"] == 5 and params["epochs"] == config.budget.max_epochs and params["seed"] == config.search.seed


def test_infeasible_trial_resources_fail_fast(ray_runtime, tmp_path):
    config = sweep_config(tmp_path, resources={"workers_per_trial": 3, "cpus_per_worker": 1})
    with pytest.raises(MsaError, match=r"a trial needs 3 workers x \{CPU: 1\} \(placement PACK\) but the cluster can hold "
                                       r"at most 2 such workers across the nodes"):  # a message, not a hang
        run_sweep(config)
    assert not (tmp_path / "sweeps").exists()  # and no run directory, nor the storage folder it made


def test_an_address_is_refused_when_the_process_already_runs_ray(ray_runtime, tmp_path):
    with pytest.raises(MsaError, match=r"cannot join the Ray cluster at 'head-node:6379': this process already runs Ray"):
        run_sweep(sweep_config(tmp_path), address="head-node:6379")
    assert not (tmp_path / "sweeps").exists()


def trial_spans(run_dir: Path) -> dict[str, tuple[str, float, float]]:
    """Ray's own record of each trial: its pair and when it ran, from its ``result.json`` (the
    last report's whole-second ``timestamp`` less the trainable's ``time_total_s``)."""
    spans = {}
    for result_file in RunDir(run_dir).tune_experiment.glob("*/result.json"):
        rows = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        last = rows[-1]
        spans[last["trial_id"]] = (last["config"]["msa_pair"], last["timestamp"] - last["time_total_s"], last["timestamp"])
    return spans


def overlap(a: tuple[str, float, float], b: tuple[str, float, float]) -> float:
    return min(a[2], b[2]) - max(a[1], b[1])


def test_a_two_by_two_sweep_runs_its_studies_at_once_within_the_per_pair_cap(reference_sweep, mlflow_client):
    """The reference sweep: two slots, at most one trial per pair at a time. Ray's records show
    trials of different pairs running together and never two of one pair; each pair keeps its
    own budget, and the first study is registered while the last still runs. The console has one
    line per trial event and per registration, status lines per pair, and not Ray's trial table."""
    console, run_dir, rows = reference_sweep.console, reference_sweep.run_dir, reference_sweep.pairs
    events = [line for line in console if re.fullmatch(r"\[[a-z_-]+\] trial \w+ (complete|pruned) at epoch \d: .*", line)]
    assert len(events) == 12, console
    assert sum(re.match(r"\[[a-z_-]+ *\] \d/3 done", line) is not None for line in console) >= 4  # one per pair
    assert sum(" registered msa-" in line for line in console) == 4
    assert not any("Trial name" in line or "Configuration for experiment" in line for line in console)
    assert [(r.pair, r.trials, r.failed) for r in rows] == [(pair, 3, 0) for pair in REFERENCE_PAIRS]
    spans = trial_spans(run_dir)
    assert len(spans) == 12
    assert {pair for pair, _, _ in spans.values()} == set(REFERENCE_PAIRS)
    together = [overlap(a, b) for a in spans.values() for b in spans.values() if a[0] < b[0]]
    assert max(together) > 1.5, sorted(spans.values(), key=lambda span: span[1])  # beyond the 1 s resolution
    for a_id, a in spans.items():  # the cap of one per pair (1 s: the records' resolution)
        for b_id, b in spans.items():
            if a_id < b_id and a[0] == b[0]:
                assert overlap(a, b) <= 1.0, (a_id, a, b_id, b)
    last_end = max(end for _, _, end in spans.values())
    (first,) = versions_of(mlflow_client, "msa-baseline-synth_regression")
    assert first.creation_timestamp / 1000 < last_end - 2, "registered only at the end of the sweep"
    studies_runs = mlflow_client.search_runs([mlflow_client.get_experiment_by_name(run_dir.name).experiment_id],
                                             filter_string="tags.`msa.role` = 'study'")
    assert {r.info.status for r in studies_runs} == {"FINISHED"} and len(studies_runs) == 4


def test_each_new_study_starts_with_the_models_default_config(reference_sweep):
    """Every study's first trial is its model's defaults under the sweep's train: section, clipped
    into the search space (so a small budget never ends below them); the console says so."""
    run_dir = reference_sweep.run_dir
    config = load_sweep_config(run_dir / "sweep.yaml")
    dataset = synthesize("regression", seed=0, sizes={"train": 8, "valid": 4, "test": 4})
    for pair, study in studies(run_dir).items():
        model = pair.split("-", 1)[0]
        space = load_search_space(model)
        base = resolve_config({**trial_param_space(config, space, model, dataset, "mae"), "data": "unused", "out": "unused"})
        first = min(study.trials, key=lambda trial: trial.number)
        assert first.params == space.default_point(base), pair
        assert f"[{pair}] first trial: the model's default config, clipped into its search space" in reference_sweep.console
        assert all(trial.params != first.params for trial in study.trials if trial.number != first.number)


def test_asha_prunes_trials_of_a_matrix_sweep_and_optuna_keeps_what_they_reached(reference_sweep):
    """The reference sweep's pairs in the sweep's order, each with its metric, budget and a best
    checkpoint whose weights match their recorded SHA-256; ASHA stopped some trials, which
    Optuna lists as PRUNED with their per-epoch values."""
    rows, run_dir = reference_sweep.pairs, reference_sweep.run_dir
    assert [r.pair for r in rows] == REFERENCE_PAIRS
    assert [r.metric for r in rows] == ["valid_mae", "valid_acc", "valid_mae", "valid_acc"]
    for row in rows:
        assert row.trials == 3 and row.failed == 0 and row.complete + row.pruned == 3
        folder = Path(row.best_checkpoint)
        metrics = json.loads((folder / "metrics.json").read_text())
        assert hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest() == metrics["weights_sha256"]
    pruned = [t for s in studies(run_dir).values() for t in s.trials if t.state == TrialState.PRUNED]
    assert pruned, "ASHA stopped no trial; Optuna must list scheduler-stopped trials as PRUNED"
    for trial in pruned:  # Optuna's value of a pruned trial is its last intermediate value
        assert trial.intermediate_values, "a pruned trial must keep its per-epoch values"
        assert trial.value == trial.intermediate_values[max(trial.intermediate_values)]
        assert max(trial.intermediate_values) < 3  # stopped before max_epochs
    assert (run_dir / "summary.csv").is_file()


def test_a_pair_out_of_time_ends_its_study_and_lets_its_running_seed_group_finish_whole(ray_runtime, mlflow_client,
                                                                                       tmp_path):
    """`time_budget_s` per pair stops groups from starting, never a running one: the 1 s budget
    runs out while the first group (2 seeds, several seconds) trains. That group still trains
    both its seeds to the end, no second one starts, the study records that it ran out, is closed
    and registered once, and the sweep returns normally instead of reporting an interruption."""
    config = sweep_config(tmp_path, name="timed", datasets=[str(synth_data(tmp_path, "timed"))], train={"patience": 10},
                          budget={"trials_per_pair": 4, "seeds_per_trial": 2, "max_epochs": 3, "time_budget_s": 1.0},
                          tracking={"uri": mlflow_client.tracking_uri})
    (row,) = run_sweep(config).pairs  # its own sweep: the time budget is what it tests
    (run_dir,) = (tmp_path / "sweeps").glob("timed-*")
    (study,) = studies(run_dir).values()
    assert (row.trials, row.complete) == (1, 1) and len(study.trials) == 1
    assert study.user_attrs["out_of_time"] is True
    group = SeedGroup(row.best_checkpoint)
    assert group.exists() and group.seeds == [0, 1]
    assert [[int(r["epoch"]) for r in history] for history in seed_histories(group.folder).values()] == [[1, 2, 3]] * 2
    versions = versions_of(mlflow_client, "msa-baseline-timed")
    assert len(versions) == 1  # closed and registered once
    assert versions[0].tags["seeds"] == "0,1" and versions[0].tags["ray_trial_id"] == group.folder.name


def test_asha_in_training_seconds_stops_every_trial_at_its_maximum_in_seconds(ray_runtime, mlflow_client, tmp_path):
    """`budget_unit: seconds`: ASHA counts Tune's `time_total_s`. With 500 epochs allowed and a
    maximum of 10 training seconds (Tune counts the first epoch's set-up in), the trial (alone in
    its rungs, so only the maximum can stop it) is stopped by the first epoch that ends past 10 s,
    long before its epochs run out, and Optuna records it as stopped by the scheduler."""
    config = sweep_config(tmp_path, name="seconds", datasets=[str(synth_data(tmp_path, "seconds"))],
                          train={"patience": 500}, budget={"trials_per_pair": 1, "max_epochs": 500, "max_trial_seconds": 10},
                          search={"scheduler": "asha", "budget_unit": "seconds", "grace_period": 1},
                          tracking={"uri": mlflow_client.tracking_uri})
    (row,) = run_sweep(config).pairs  # its own sweep: a scheduler counting seconds is what it tests
    (run_dir,) = (tmp_path / "sweeps").glob("seconds-*")
    (results,) = [[json.loads(line) for line in path.read_text().splitlines()]
                  for path in RunDir(run_dir).tune_experiment.glob("*/result.json")]
    assert row.trials == row.pruned == 1
    assert results[-1]["time_total_s"] >= 10 > max(result["time_total_s"] for result in results[:-1])
    assert results[-1]["epoch"] == len(results) < 500


def test_failing_trials_are_retried_then_recorded_as_failed_and_the_sweep_goes_on(ray_runtime, mlflow_client, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {type: categorical, choices: [1.0e-3, 1.0e+30]}  # 1e30: the loss is NaN in epoch 1\n")
    config = sweep_config(tmp_path, name="failing", datasets=[str(synth_data(tmp_path, "failing"))],
                          budget={"trials_per_pair": 4},
                          search={"sampler": "random", "seed": 0, "spaces": {"baseline": str(space)}},
                          resources={"max_concurrent_trials": 2, "max_failures": 1},
                          tracking={"uri": mlflow_client.tracking_uri})
    (row,) = run_sweep(config).pairs  # its own sweep: trials that fail on purpose, then --resume
    (run_dir,) = (tmp_path / "sweeps").glob("failing-*")

    (study,) = studies(run_dir).values()
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(study.trials) == 4 and len(failed) + len(complete) == 4
    assert failed and complete, "seed 0 must draw both learning rates"
    assert {t.params["lr"] for t in failed} == {1e30} and {t.params["lr"] for t in complete} == {1e-3}
    assert (row.failed, row.complete) == (len(failed), len(complete))
    assert row.best_checkpoint is not None
    for trial in failed:  # tried once, retried once (max_failures=1), then given up
        error_log = (RunDir(run_dir).tune_experiment / trial.user_attrs["ray_trial_id"] / "error.txt").read_text()
        assert "training loss became nan in epoch 1" in error_log
        assert error_log.count("Failure #") == 2, error_log[:2000]
        # Ray, Optuna and MLflow give the same reason: the last line of Ray's error record.
        reason = error_log.strip().splitlines()[-1].strip()
        assert reason.endswith("NonFiniteLossError: training loss became nan in epoch 1; lower lr or check the data")
        assert trial.user_attrs["fail_reason"] == reason
    # two attempts of a failed trial: one run, FAILED
    runs = {r.data.tags["ray_trial_id"]: r for r in trial_runs(mlflow_client, run_dir)}
    assert len(runs) == 4
    for trial in failed:
        run = runs[trial.user_attrs["ray_trial_id"]]
        assert run.info.status == "FAILED" and run.data.tags["msa.trial_state"] == "failed"
        assert run.data.tags["msa.fail_reason"] == trial.user_attrs["fail_reason"]
        assert run.data.params["lr"] == "1e+30"
    assert {runs[t.user_attrs["ray_trial_id"]].info.status for t in complete} == {"FINISHED"}

    # --resume of a sweep whose failed trials used up their retries: none is started again.
    error_logs = {t.user_attrs["ray_trial_id"]: RunDir(run_dir).tune_experiment / t.user_attrs["ray_trial_id"]
                  / "error.txt" for t in failed}
    before = {trial_id: path.read_text() for trial_id, path in error_logs.items()}
    (resumed,) = run_sweep(config, resume_dir=run_dir).pairs
    assert (resumed.trials, resumed.failed, resumed.complete) == (4, len(failed), len(complete))
    assert {trial_id: path.read_text() for trial_id, path in error_logs.items()} == before  # no new attempt
    (study,) = studies(run_dir).values()
    assert sorted(t.state.name for t in study.trials) == sorted(["FAIL"] * len(failed) + ["COMPLETE"] * len(complete))
    runs = {r.data.tags["ray_trial_id"]: r for r in trial_runs(mlflow_client, run_dir)}
    assert len(runs) == 4
    assert {runs[t.user_attrs["ray_trial_id"]].info.status for t in failed} == {"FAILED"}


def test_a_raising_trial_resumes_from_its_checkpoint_and_a_crashed_tracking_server_loses_no_epoch(
        ray_runtime, tmp_path, tracking_store):
    """Two faults in one sweep. The trial raises at the start of epoch 4 and is retried from its
    last checkpoint: its losses match an uninterrupted run. Its MLflow server is SIGKILLed (as the
    OOM killer would) after epoch 1: the guard starts it again on the same port and store, and the
    trial's retried requests land, each epoch once."""
    store = tmp_path / "tracking"
    with tracking_store(store) as mlflow_client:  # a server of its own: the test kills it
        config = sweep_config(tmp_path, name="raise", train={"patience": 6, "inject_fault": "raise", "inject_fault_epoch": 4},
                              budget={"max_epochs": 6}, tracking={"uri": mlflow_client.tracking_uri})
        outcome: list = []
        sweep_thread = threading.Thread(target=lambda: outcome.append(run_sweep(config).pairs))
        sweep_thread.start()
        deadline = time.time() + 300
        while time.time() < deadline and not list((tmp_path / "sweeps").glob("raise-*/trials/*/*/metrics.json")):
            time.sleep(0.2)  # until the trial has logged epoch 1 and written its best checkpoint
        pgrep = lambda *args: subprocess.run(["pgrep", *args], capture_output=True, text=True).stdout.split()  # noqa: E731
        (guard,) = pgrep("-f", f"msa.platform.tracking.guard .*{store}/mlflow/mlflow.db")
        (server,) = pgrep("-g", guard, "-f", "uvicorn")
        os.kill(int(server), signal.SIGKILL)
        sweep_thread.join(timeout=600)
        assert outcome, "the sweep did not finish"
        ((row,),) = outcome
        (run_dir,) = (tmp_path / "sweeps").glob("raise-*")
        log = RunDir(store).mlflow_log.read_text()
        assert "[guard] mlflow server exited with status" in log and "starting it again (1/3)" in log

        (study,) = studies(run_dir).values()
        (trial,) = study.trials
        # A retry that started over would meet the fault again and, with max_failures 1, fail.
        assert trial.state == TrialState.COMPLETE and row.complete == 1
        trial_id = trial.user_attrs["ray_trial_id"]
        error_log = (RunDir(run_dir).tune_experiment / trial_id / "error.txt").read_text()
        assert error_log.count("Failure #") == 1 and "injected fault: rank 0 raised at the start of epoch 4" in error_log

        resolved = yaml.safe_load((Path(row.best_checkpoint) / "config.yaml").read_text())
        fields = {k: v for k, v in resolved.items() if k in TrainConfig.__dataclass_fields__}
        uninterrupted = train_loop({**fields, "inject_fault": "none", "out": str(tmp_path / "uninterrupted")})
        (run,) = trial_runs(mlflow_client, run_dir)
        assert run.info.status == "FINISHED"
        for name in ("train_loss", "valid_mae"):
            logged = sorted((m.step, m.value) for m in mlflow_client.get_metric_history(run.info.run_id, name))
            assert [step for step, _ in logged] == [1, 2, 3, 4, 5, 6]  # each epoch once, across both faults
            expected = [record[name] for record in uninterrupted.history]
            assert [value for _, value in logged] == pytest.approx(expected, rel=1e-5, abs=1e-6)


def killed_train_workers(ray_runtime) -> int:
    """Ray Train workers of this runtime whose process died (rather than being shut down)."""
    from ray.util.state import list_actors

    dead = list_actors(address=ray_runtime.get_runtime_context().gcs_address, detail=True, limit=10_000,
                       filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "DEAD")])
    return sum("worker process has died" in str(actor.death_cause) for actor in dead)


def test_a_killed_worker_of_a_two_worker_zero2_encoder_trial_is_replaced_and_the_trial_resumes_from_its_checkpoint(
        ray_runtime, mlflow_client, tmp_path, tiny_bert):
    """One trial of two data-parallel Ray Train workers under ZeRO-2 that trains the tiny BERT end
    to end inside the DeepSpeed engine. Rank 1 SIGKILLs itself at the start of epoch 2 of any
    attempt that did not resume from a checkpoint, so completing within one retry means the new
    worker group resumed from epoch 1's: the encoder, fine-tuned across both ranks, included."""
    data = synth_data(tmp_path, "two_workers", sizes={"train": 64, "valid": 24, "test": 24}, suffix=".npz")
    config = sweep_config(
        tmp_path, name="kill", datasets=[str(data)], budget={"max_epochs": 3}, deepspeed={"zero_stage": 2},
        train={"batch_size": 16, "inject_fault": "kill", "inject_fault_epoch": 2,
               "text_encoder": {"path": str(tiny_bert), "max_length": 12}},
        resources={"workers_per_trial": 2, "cpus_per_worker": 1, "max_failures": 1}, tracking={"uri": mlflow_client.tracking_uri},
    )
    killed_before = killed_train_workers(ray_runtime)
    (row,) = run_sweep(config).pairs  # its own sweep: two-worker trials, a worker killed on purpose
    assert killed_train_workers(ray_runtime) == killed_before + 1
    (run_dir,) = (tmp_path / "sweeps").glob("kill-*")
    (study,) = studies(run_dir).values()
    (trial,) = study.trials
    assert trial.state == TrialState.COMPLETE and row.complete == 1
    (run,) = trial_runs(mlflow_client, run_dir)
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in mlflow_client.get_metric_history(run.info.run_id, "train_loss")) == [1, 2, 3]

    checkpoint = Checkpoint(row.best_checkpoint)
    assert checkpoint.config["zero_stage"] == 2 and checkpoint.config["text_encoder"]["freeze_layers"] == 0
    assert (checkpoint.verified_text_encoder("test") / "tokenizer.json").is_file()  # the encoder's files, digests checked
    weights = torch.load(checkpoint.verified_weights("test"), weights_only=True)
    pretrained = load_encoder(tiny_bert).state_dict()
    assert not torch.equal(weights["encoder.encoder.layer.0.attention.self.query.weight"],
                           pretrained["encoder.layer.0.attention.self.query.weight"])  # fine-tuned across 2 ranks
    # ZeRO-2 partitions the optimizer state, encoder included, over the two ranks: one shard per rank
    assert list((run_dir / "train").rglob("zero_pp_rank_1_*optim_states.pt"))
