"""MLflow tracking of a real sweep, read back through `MlflowClient` alone from a real server:
the run hierarchy, each trial's params, epochs, artifacts and inputs, retries and concurrency.

The sweep is the session's reference sweep (tests/conftest.py: 4 studies, 3 trials each, ASHA),
read from the session's MLflow server it logged to."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from msa.platform.cli import main
from msa.platform.core.run_dir import RunDir
from msa.platform.tracking.client import PAIR_TAG, TRIAL_TAG
from msa.platform.tracking.runs import EpochLogger, TrialTracking, open_trial_run
from msa.platform.training.config import TrainConfig


def runs_by_role(sweep) -> dict[str, list]:
    mlflow_client = sweep["client"]
    experiment = mlflow_client.get_experiment_by_name(sweep["run_dir"].name)
    runs = mlflow_client.search_runs([experiment.experiment_id])
    grouped: dict[str, list] = {}
    for run in runs:
        grouped.setdefault(run.data.tags["msa.role"], []).append(run)
    return grouped


def tune_iterations(run_dir: Path, trial_id: str) -> int:
    """Epochs Tune received from the trial (its own record, independent of MLflow)."""
    lines = (RunDir(run_dir).tune_experiment / trial_id / "result.json").read_text().splitlines()
    return max(json.loads(line)["training_iteration"] for line in lines if line.strip())


def test_runs_nest_sweep_study_trials_and_match_the_trial_count(sweep, reference_sweep):
    runs = runs_by_role(sweep)
    (sweep_run,) = runs["sweep"]
    studies = {r.data.tags[PAIR_TAG]: r for r in runs["study"]}
    assert sorted(studies) == sorted(row.pair for row in reference_sweep.pairs)
    assert len(runs["trial"]) == sum(row.trials for row in reference_sweep.pairs) == 12
    assert len({r.data.tags[TRIAL_TAG] for r in runs["trial"]}) == 12
    assert all(r.info.status == "FINISHED" for r in runs["sweep"] + runs["study"] + runs["trial"])
    assert sweep_run.data.params["budget.trials_per_pair"] == "3"
    for pair, study_run in studies.items():
        assert study_run.data.tags["mlflow.parentRunId"] == sweep_run.info.run_id
        trials = [r for r in runs["trial"] if r.data.tags[PAIR_TAG] == pair]
        assert len(trials) == reference_sweep.pair(pair).trials == 3
        assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {study_run.info.run_id}
        plots = {a.path for a in sweep["client"].list_artifacts(study_run.info.run_id, "plots")}
        assert "plots/optimization_history.png" in plots
        assert study_run.data.metrics["trials_complete"] + study_run.data.metrics["trials_pruned"] == 3


def test_every_trial_run_has_params_epoch_metrics_artifacts_tags_and_inputs(sweep, reference_sweep):
    mlflow_client, run_dir = sweep["client"], sweep["run_dir"]
    fingerprints = {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in reference_sweep.data.items()}
    valid_metrics = {"synth_regression": {"valid_mae", "valid_corr", "valid_acc7"},
                     "synth_classification": {"valid_acc", "valid_f1_macro"}}
    states = set()
    for run in runs_by_role(sweep)["trial"]:
        trial_id, run_id, pair = run.data.tags[TRIAL_TAG], run.info.run_id, run.data.tags[PAIR_TAG]
        model, dataset = pair.split("-", 1)
        params = run.data.params
        config = yaml.safe_load((run_dir / "trials" / pair / trial_id / "config.yaml").read_text())
        for key in ("lr", "weight_decay", "batch_size", "seed", "epochs"):
            assert float(params[key]) == float(config[key]), key
        assert float(params["model_config.hidden"]) == config["model_config"]["hidden"]
        assert "model_config.dropout" in params and params["model"] == model

        epochs = tune_iterations(run_dir, trial_id)
        per_epoch = [k for k in run.data.metrics if k.startswith(("train_", "valid_"))]
        assert {"train_loss", "train_task_loss", *valid_metrics[dataset]} <= set(per_epoch)
        for key in per_epoch:  # every epoch of every metric, none lost, none twice
            steps = sorted(m.step for m in mlflow_client.get_metric_history(run_id, key))
            assert steps == list(range(1, epochs + 1)), (trial_id, key, steps)
        stored = json.loads((run_dir / "trials" / pair / trial_id / "metrics.json").read_text())
        metric = stored["selection_metric"]
        assert run.data.metrics[f"test_{metric}"] == pytest.approx(stored["test"][metric])
        assert run.data.metrics["best_epoch"] == stored["best_epoch"]

        artifacts = {a.path for a in mlflow_client.list_artifacts(run_id)}
        assert {"config.yaml", "predictions_valid.csv", "predictions_test.csv", "checkpoint", "plots"} <= artifacts
        assert {"checkpoint/model.pt", "checkpoint/metrics.json"} <= {a.path for a in mlflow_client.list_artifacts(run_id, "checkpoint")}
        assert [a.path for a in mlflow_client.list_artifacts(run_id, "plots")] == ["plots/learning_curves.png"]

        tags = run.data.tags
        assert tags["dataset_fingerprint"] == fingerprints[dataset] and tags["seed"] == "0"
        assert tags["host"] and tags["git_commit"] and tags["version.torch"].startswith("2.")
        assert tags["weights_sha256"] == stored["weights_sha256"]
        states.add(tags["msa.trial_state"])
        (dataset_input,) = run.inputs.dataset_inputs
        assert dataset_input.dataset.name == dataset and fingerprints[dataset].startswith(dataset_input.dataset.digest)
    assert states <= {"complete", "pruned"} and "complete" in states


def test_a_retried_trial_finds_its_run_and_never_relogs_a_param(mlflow_client, synth_regression_pkl):
    experiment = mlflow_client.create_experiment("retry-check")
    study_run_id = mlflow_client.create_run(experiment).info.run_id
    tracking = TrialTracking(
        uri=mlflow_client.tracking_uri, experiment_id=experiment, study_run_id=study_run_id, pair="retry-check", tags={},
        dataset_name="synth_regression", dataset_source=str(synth_regression_pkl), dataset_fingerprint="0" * 64,
    )
    config = TrainConfig(model="baseline", data=tracking.dataset_source, lr=0.001)
    first = open_trial_run(tracking, "retry_0001", config)
    again = open_trial_run(tracking, "retry_0001", dataclasses.replace(config, lr=0.5))
    assert again == first
    assert mlflow_client.get_run(first).data.params["lr"] == "0.001"


def test_trials_opening_runs_at_once_all_get_the_dataset_input(mlflow_client, synth_regression_pkl):
    """Concurrent trials log the same new dataset: MLflow's store checks, then inserts, so all but
    one can hit its unique key (seen in a 4-model sweep); every run must still get its input."""
    import threading

    experiment = mlflow_client.create_experiment("dataset-race")
    source = str(synth_regression_pkl)
    parent = mlflow_client.create_run(experiment).info.run_id
    tracking = TrialTracking(uri=mlflow_client.tracking_uri, experiment_id=experiment, study_run_id=parent, pair="race", tags={},
                             dataset_name="synth_regression", dataset_source=source, dataset_fingerprint="1" * 64)
    config = TrainConfig(model="baseline", data=source)
    start, run_ids, errors = threading.Barrier(8), {}, []

    def open_run(index: int) -> None:
        start.wait()
        try:
            run_ids[index] = open_trial_run(tracking, f"race_{index}", config)
        except Exception as error:  # noqa: BLE001 - reported below with the others
            errors.append(repr(error))

    threads = [threading.Thread(target=open_run, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    for run_id in run_ids.values():
        inputs = mlflow_client.get_run(run_id).inputs.dataset_inputs
        assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("synth_regression", "1" * 36)]


def test_two_processes_logging_epochs_to_one_server_lose_nothing(mlflow_server, mlflow_client):
    """Two writers at once, as two concurrent trials are: every metric of every epoch arrives."""
    experiment = mlflow_client.create_experiment("concurrency")
    run_ids = [mlflow_client.create_run(experiment).info.run_id for _ in range(2)]
    writer = textwrap.dedent(f"""
        import sys
        from msa.platform.tracking.runs import EpochLogger
        log = EpochLogger({mlflow_server.uri!r}, sys.argv[1])
        for epoch in range(1, 61):
            log({{"epoch": epoch, **{{f"valid_m{{i}}": epoch + i / 100 for i in range(20)}}}})
    """)
    writers = [subprocess.Popen([sys.executable, "-c", writer, run_id], stderr=subprocess.PIPE, text=True) for run_id in run_ids]
    errors = [w.communicate(timeout=300)[1] for w in writers]
    assert [w.returncode for w in writers] == [0, 0], errors
    for run_id in run_ids:
        for i in (0, 7, 19):
            history = mlflow_client.get_metric_history(run_id, f"valid_m{i}")
            assert sorted(m.step for m in history) == list(range(1, 61))
    assert "database is locked" not in mlflow_server.log_path.read_text()


def test_an_unreachable_tracking_uri_stops_the_sweep_before_anything_is_written(tmp_path, capsys):
    from msa.platform.tracking.server import free_port

    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({"name": "t", "storage": str(tmp_path / "sweeps"), "datasets": ["synth_regression"],
                                      "models": ["baseline"]}))
    uri = f"http://127.0.0.1:{free_port()}"
    assert main(["sweep", str(config), f"tracking.uri={uri}"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and uri in err and "unreachable" in err
    assert not (tmp_path / "sweeps").exists()


def test_a_resumed_attempt_does_not_log_an_epoch_twice(mlflow_client):
    run_id = mlflow_client.create_run(mlflow_client.create_experiment("resume-epochs")).info.run_id
    first = EpochLogger(mlflow_client.tracking_uri, run_id)
    for epoch in (1, 2):  # logged, then the attempt dies before checkpointing epoch 2
        first({"epoch": epoch, "train_loss": 1.0 / epoch, "final": 0.0})
    again = EpochLogger(mlflow_client.tracking_uri, run_id)  # resumes from the epoch-1 checkpoint
    for epoch in (2, 3):
        again({"epoch": epoch, "train_loss": 10.0 + epoch, "final": 0.0})
    history = sorted((m.step, m.value) for m in mlflow_client.get_metric_history(run_id, "train_loss"))
    assert history == [(1, 1.0), (2, 0.5), (3, 13.0)]
