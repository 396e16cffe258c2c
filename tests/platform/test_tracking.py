"""MLflow tracking of a real sweep, read back through `MlflowClient` alone from a real server;
the registered model through `mlflow.pyfunc`; `msa registry` and `msa predict`.

One small sweep (4 trials, 2 at a time, ASHA) runs once for the module on the session's Ray."""
from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pytest
import yaml

from msa.platform.cli import main
from msa.platform.mlflow_server import MlflowServer, client
from msa.platform.readers import load_dataset, write_npz
from msa.platform.sweep import run_sweep
from msa.platform.sweep_config import load_sweep_config
from msa.platform.tracking import TRIAL_TAG, EpochLogger, TrialTracking, open_trial_run

PAIR = "baseline-synth_regression"
MODEL_NAME = "msa-baseline-synth_regression"


@pytest.fixture(scope="module")
def sweep(ray_runtime, tmp_path_factory):
    """The finished sweep's run directory and summary row, and its store served for reading."""
    tmp_path = tmp_path_factory.mktemp("tracked")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tracked", "storage": str(tmp_path / "sweeps"), "datasets": ["synth_regression"], "models": ["baseline"],
        "budget": {"trials_per_pair": 4, "max_epochs": 3},
        "search": {"seed": 0, "scheduler": "asha", "grace_period": 1, "reduction_factor": 2},
        "resources": {"workers_per_trial": 1, "max_concurrent_trials": 2}, "train": {"patience": 5},
    }))
    (row,) = run_sweep(load_sweep_config(path))
    (run_dir,) = (tmp_path / "sweeps").glob("tracked-*")
    with MlflowServer(run_dir) as server:
        yield {"run_dir": run_dir, "row": row, "uri": server.uri, "client": client(server.uri)}


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
    lines = (run_dir / "ray" / PAIR / trial_id / "result.json").read_text().splitlines()
    return max(json.loads(line)["training_iteration"] for line in lines if line.strip())


def test_runs_nest_sweep_study_trials_and_match_the_trial_count(sweep):
    runs = runs_by_role(sweep)
    (sweep_run,) = runs["sweep"]
    (study_run,) = runs["study"]
    assert len(runs["trial"]) == sweep["row"]["trials"] == 4
    assert study_run.data.tags["mlflow.parentRunId"] == sweep_run.info.run_id
    assert {r.data.tags["mlflow.parentRunId"] for r in runs["trial"]} == {study_run.info.run_id}
    assert len({r.data.tags[TRIAL_TAG] for r in runs["trial"]}) == 4
    assert all(r.info.status == "FINISHED" for r in runs["sweep"] + runs["study"] + runs["trial"])
    assert sweep_run.data.params["budget.trials_per_pair"] == "4"
    assert {"plots/optimization_history.png"} <= {a.path for a in sweep["client"].list_artifacts(study_run.info.run_id, "plots")}
    assert study_run.data.metrics["trials_complete"] + study_run.data.metrics["trials_pruned"] == 4


def test_every_trial_run_has_params_epoch_metrics_artifacts_tags_and_inputs(sweep):
    mlflow_client, run_dir = sweep["client"], sweep["run_dir"]
    data_file = run_dir / "data" / "synth_regression.pkl"
    fingerprint = hashlib.sha256(data_file.read_bytes()).hexdigest()
    states = set()
    for run in runs_by_role(sweep)["trial"]:
        trial_id, run_id = run.data.tags[TRIAL_TAG], run.info.run_id
        params = run.data.params
        config = yaml.safe_load((run_dir / "trials" / PAIR / trial_id / "config.yaml").read_text())
        for key in ("lr", "weight_decay", "batch_size", "seed", "epochs"):
            assert float(params[key]) == float(config[key]), key
        assert float(params["model_config.hidden"]) == config["model_config"]["hidden"]
        assert "model_config.dropout" in params and params["model"] == "baseline"

        epochs = tune_iterations(run_dir, trial_id)
        per_epoch = [k for k in run.data.metrics if k.startswith(("train_", "valid_"))]
        assert {"train_loss", "train_task_loss", "valid_mae", "valid_corr", "valid_acc7"} <= set(per_epoch)
        for key in per_epoch:  # every epoch of every metric, none lost, none twice
            steps = sorted(m.step for m in mlflow_client.get_metric_history(run_id, key))
            assert steps == list(range(1, epochs + 1)), (trial_id, key, steps)
        stored = json.loads((run_dir / "trials" / PAIR / trial_id / "metrics.json").read_text())
        assert run.data.metrics["test_mae"] == pytest.approx(stored["test"]["mae"])
        assert run.data.metrics["best_epoch"] == stored["best_epoch"]

        artifacts = {a.path for a in mlflow_client.list_artifacts(run_id)}
        assert {"config.yaml", "predictions_valid.csv", "predictions_test.csv", "checkpoint", "plots"} <= artifacts
        assert {"checkpoint/model.pt", "checkpoint/metrics.json"} <= {a.path for a in mlflow_client.list_artifacts(run_id, "checkpoint")}
        assert [a.path for a in mlflow_client.list_artifacts(run_id, "plots")] == ["plots/learning_curves.png"]

        tags = run.data.tags
        assert tags["dataset_fingerprint"] == fingerprint and tags["seed"] == "0"
        assert tags["host"] and tags["git_commit"] and tags["version.torch"].startswith("2.")
        assert tags["weights_sha256"] == stored["weights_sha256"]
        states.add(tags["msa.trial_state"])
        (dataset_input,) = run.inputs.dataset_inputs
        assert dataset_input.dataset.name == "synth_regression" and fingerprint.startswith(dataset_input.dataset.digest)
    assert states <= {"complete", "pruned"} and "complete" in states


def test_the_best_trial_is_registered_and_reproduces_its_stored_test_predictions(sweep, tmp_path):
    mlflow_client, row = sweep["client"], sweep["row"]
    version = mlflow_client.get_model_version_by_alias(MODEL_NAME, "champion")
    best_trial = Path(row["best_checkpoint"]).name
    assert version.tags[TRIAL_TAG] == best_trial
    assert mlflow_client.get_run(version.run_id).data.tags[TRIAL_TAG] == best_trial
    assert float(version.tags["valid_mae"]) == pytest.approx(row["best_value"])

    stored_csv = mlflow_client.download_artifacts(version.run_id, "predictions_test.csv", str(tmp_path))
    with open(stored_csv, newline="") as handle:
        stored = np.array([float(r["prediction"]) for r in csv.DictReader(handle)], dtype=np.float32)
    mlflow.set_tracking_uri(sweep["uri"])
    mlflow.set_registry_uri(sweep["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    test = load_dataset(sweep["run_dir"] / "data" / "synth_regression.pkl").splits["test"]
    inputs = {**{m: x for m, x in test.features.items()}, **{f"{m}_lengths": n for m, n in test.lengths.items()}}
    predicted = model.predict(inputs)
    assert predicted.dtype == np.float32 and np.array_equal(predicted, stored)


def test_a_modified_checkpoint_is_neither_registered_nor_loaded(sweep, tmp_path):
    import shutil

    from msa.platform.errors import MsaError
    from msa.platform.model_registry import LoadedCheckpoint, register_checkpoint

    folder = tmp_path / "checkpoint"
    shutil.copytree(sweep["row"]["best_checkpoint"], folder)
    LoadedCheckpoint(folder)  # intact, it loads
    with (folder / "model.pt").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(MsaError, match=r"registering msa-tampered: SHA-256 of .*model\.pt is .*the checkpoint was modified"):
        register_checkpoint(sweep["uri"], "unused", folder, "msa-tampered", {})
    assert sweep["client"].search_model_versions("name='msa-tampered'") == []
    # `load_context` of every registered checkpoint goes through LoadedCheckpoint.
    with pytest.raises(MsaError, match=r"checkpoint: SHA-256 of .*model\.pt"):
        LoadedCheckpoint(folder)


def test_msa_registry_lists_the_champion_with_its_metrics(sweep, capsys):
    assert main(["registry", "--tracking-uri", sweep["uri"]]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith(MODEL_NAME))
    assert "champion" in line and f"mae {sweep['row']['best_value']:.4g}" in line


def test_msa_predict_writes_ids_and_predictions_and_prints_metrics(sweep, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    data = sweep["run_dir"] / "data" / "synth_regression.pkl"
    code = main(["predict", "--model", f"models:/{MODEL_NAME}@champion", "--data", str(data), "--out", str(out),
                 "--tracking-uri", sweep["uri"]])
    assert code == 0
    printed = capsys.readouterr().out
    stored = json.loads((Path(sweep["row"]["best_checkpoint"]) / "metrics.json").read_text())
    assert f"mae {stored['test']['mae']:.4g}" in printed
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    with (Path(sweep["row"]["best_checkpoint"]) / "predictions_test.csv").open(newline="") as handle:
        expected = list(csv.DictReader(handle))
    assert [(r["id"], r["prediction"]) for r in rows] == [(r["id"], r["prediction"]) for r in expected]


def test_msa_predict_refuses_an_unknown_model_and_mismatched_data(sweep, tmp_path, capsys):
    data = sweep["run_dir"] / "data" / "synth_regression.pkl"
    out = tmp_path / "preds.csv"
    assert main(["predict", "--model", "models:/msa-nope@champion", "--data", str(data), "--out", str(out),
                 "--tracking-uri", sweep["uri"]]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "msa-nope" in err and "not found" in err

    dataset = load_dataset(data)
    for split in dataset.splits.values():
        split.features["audio"] = np.ascontiguousarray(split.features["audio"][:, :, :3])
    narrow = tmp_path / "narrow_audio.npz"
    write_npz(dataset, narrow)
    assert main(["predict", "--model", f"models:/{MODEL_NAME}@champion", "--data", str(narrow), "--out", str(out),
                 "--tracking-uri", sweep["uri"]]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "modality audio" in err and "d=" in err
    assert not out.exists()


def test_a_retried_trial_finds_its_run_and_never_relogs_a_param(sweep):
    mlflow_client = sweep["client"]
    study_run = runs_by_role(sweep)["study"][0]
    tracking = TrialTracking(
        uri=sweep["uri"], experiment_id=study_run.info.experiment_id, study_run_id=study_run.info.run_id, pair="retry-check",
        tags={}, dataset_name="synth_regression", dataset_source=str(sweep["run_dir"] / "data" / "synth_regression.pkl"),
        dataset_fingerprint="0" * 64,
    )
    config = {"model": "baseline", "data": tracking.dataset_source, "lr": 0.001}
    first = open_trial_run(tracking, "retry_0001", config)
    again = open_trial_run(tracking, "retry_0001", {**config, "lr": 0.5})
    assert again == first
    assert mlflow_client.get_run(first).data.params["lr"] == "0.001"


def test_trials_opening_runs_at_once_all_get_the_dataset_input(sweep):
    """Concurrent trials log the same new dataset: MLflow's store checks, then inserts, so all but
    one can hit its unique key (seen in a 4-model sweep); every run must still get its input."""
    import threading

    mlflow_client = sweep["client"]
    experiment = mlflow_client.create_experiment("dataset-race")
    source = str(sweep["run_dir"] / "data" / "synth_regression.pkl")
    parent = mlflow_client.create_run(experiment).info.run_id
    tracking = TrialTracking(uri=sweep["uri"], experiment_id=experiment, study_run_id=parent, pair="race", tags={},
                             dataset_name="synth_regression", dataset_source=source, dataset_fingerprint="1" * 64)
    config = {"model": "baseline", "data": source}
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


def test_two_processes_logging_epochs_to_one_server_lose_nothing(sweep, tmp_path):
    """Two writers at once, as two concurrent trials are: every metric of every epoch arrives."""
    mlflow_client = sweep["client"]
    experiment = mlflow_client.create_experiment("concurrency")
    run_ids = [mlflow_client.create_run(experiment).info.run_id for _ in range(2)]
    writer = textwrap.dedent(f"""
        import sys
        from msa.platform.tracking import EpochLogger
        log = EpochLogger({sweep['uri']!r}, sys.argv[1])
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
    log = (sweep["run_dir"] / "mlflow" / "server.log").read_text()
    assert "database is locked" not in log


def test_an_unreachable_tracking_uri_stops_the_sweep_before_anything_is_written(tmp_path, capsys):
    from msa.platform.mlflow_server import free_port

    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({"name": "t", "storage": str(tmp_path / "sweeps"), "datasets": ["synth_regression"],
                                      "models": ["baseline"]}))
    uri = f"http://127.0.0.1:{free_port()}"
    assert main(["sweep", str(config), f"tracking.uri={uri}"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and uri in err and "unreachable" in err
    assert not (tmp_path / "sweeps").exists()


def test_registry_without_a_tracking_server_says_how_to_name_one(monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["registry"]) == 2
    assert "no tracking server: pass --tracking-uri URI or --run-dir RUN_DIR" in capsys.readouterr().err


def test_a_resumed_attempt_does_not_log_an_epoch_twice(sweep):
    mlflow_client = sweep["client"]
    run_id = mlflow_client.create_run(mlflow_client.create_experiment("resume-epochs")).info.run_id
    first = EpochLogger(sweep["uri"], run_id)
    for epoch in (1, 2):  # logged, then the attempt dies before checkpointing epoch 2
        first({"epoch": epoch, "train_loss": 1.0 / epoch, "final": 0.0})
    again = EpochLogger(sweep["uri"], run_id)  # resumes from the epoch-1 checkpoint
    for epoch in (2, 3):
        again({"epoch": epoch, "train_loss": 10.0 + epoch, "final": 0.0})
    history = sorted((m.step, m.value) for m in mlflow_client.get_metric_history(run_id, "train_loss"))
    assert history == [(1, 1.0), (2, 0.5), (3, 13.0)]
