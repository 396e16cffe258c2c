"""The model registry, on the session's reference sweep (conftest.py): the best trial registered as a
pyfunc that reproduces its stored predictions, the SHA-256 check, models registered by msa-sweep
0.1.0 (pickled under the old module path), `msa registry` and `msa predict`."""
from __future__ import annotations

import csv
import importlib
import json
import os
import shutil
from pathlib import Path

import mlflow.artifacts
import mlflow.pyfunc
import numpy as np
import pytest

from msa.platform.cli import main
from msa.platform.core.errors import MsaError
from msa.platform.data.readers import load_dataset, write_npz
from msa.platform.tracking.client import TRIAL_TAG
from msa.platform.tracking.pyfunc import CheckpointModel, LoadedCheckpoint
from msa.platform.tracking.registry import load_registered, register_checkpoint

MODEL_NAME = "msa-baseline-synth_regression"


def test_the_best_trial_is_registered_and_reproduces_its_stored_test_predictions(sweep, tmp_path):
    mlflow_client, row = sweep["client"], sweep["row"]
    version = mlflow_client.get_model_version_by_alias(MODEL_NAME, "champion")
    best_trial = Path(row.best_checkpoint).name
    assert version.tags[TRIAL_TAG] == best_trial
    assert mlflow_client.get_run(version.run_id).data.tags[TRIAL_TAG] == best_trial
    assert float(version.tags["valid_mae"]) == pytest.approx(row.best_value)

    stored_csv = mlflow_client.download_artifacts(version.run_id, "predictions_test.csv", str(tmp_path))
    with open(stored_csv, newline="") as handle:
        stored = np.array([float(r["prediction"]) for r in csv.DictReader(handle)], dtype=np.float32)
    mlflow.set_tracking_uri(sweep["uri"])
    mlflow.set_registry_uri(sweep["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    test = load_dataset(sweep["data"]).splits["test"]
    inputs = {**{m: x for m, x in test.features.items()}, **{f"{m}_lengths": n for m, n in test.lengths.items()}}
    predicted = model.predict(inputs)
    assert predicted.dtype == np.float32 and np.array_equal(predicted, stored)


def test_a_modified_checkpoint_is_neither_registered_nor_loaded(sweep, tmp_path):
    folder = tmp_path / "checkpoint"
    shutil.copytree(sweep["row"].best_checkpoint, folder)
    LoadedCheckpoint(folder)  # intact, it loads
    with (folder / "model.pt").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(MsaError, match=r"registering msa-tampered: SHA-256 of .*model\.pt is .*the checkpoint was modified"):
        register_checkpoint(sweep["uri"], "unused", folder, "msa-tampered", {})
    assert sweep["client"].search_model_versions("name='msa-tampered'") == []
    # `load_context` of every registered checkpoint goes through LoadedCheckpoint.
    with pytest.raises(MsaError, match=r"checkpoint: SHA-256 of .*model\.pt"):
        LoadedCheckpoint(folder)


def test_loading_a_model_leaves_no_mlflow_uri_for_child_processes_to_inherit(sweep, monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)
    load_registered(f"models:/{MODEL_NAME}@champion", sweep["uri"])
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ


def test_msa_registry_lists_the_champion_with_its_metrics(sweep, capsys):
    assert main(["registry", "--tracking-uri", sweep["uri"]]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith(MODEL_NAME))
    assert "champion" in line and f"mae {sweep['row'].best_value:.4g}" in line


def test_msa_predict_writes_ids_and_predictions_and_prints_metrics(sweep, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    data = sweep["data"]
    code = main(["predict", "--model", f"models:/{MODEL_NAME}@champion", "--data", str(data), "--out", str(out),
                 "--tracking-uri", sweep["uri"]])
    assert code == 0
    printed = capsys.readouterr().out
    stored = json.loads((Path(sweep["row"].best_checkpoint) / "metrics.json").read_text())
    assert f"mae {stored['test']['mae']:.4g}" in printed
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    with (Path(sweep["row"].best_checkpoint) / "predictions_test.csv").open(newline="") as handle:
        expected = list(csv.DictReader(handle))
    assert [(r["id"], r["prediction"]) for r in rows] == [(r["id"], r["prediction"]) for r in expected]


def test_msa_predict_refuses_an_unknown_model_and_mismatched_data(sweep, tmp_path, capsys):
    data = sweep["data"]
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


def test_registry_without_a_tracking_server_says_how_to_name_one(monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["registry"]) == 2
    assert "no tracking server: pass --tracking-uri URI or --run-dir RUN_DIR" in capsys.readouterr().err



def test_a_model_registered_by_0_1_0_under_the_old_module_path_still_loads(sweep, monkeypatch, tmp_path):
    """msa-sweep 0.1.0 defined the pyfunc class in `msa.platform.model_registry`, so its models'
    pickles name that path: registered the same way here, such a model loads and predicts."""
    importlib.import_module("msa.platform.model_registry")  # cloudpickle names a class only by a loaded module
    monkeypatch.setattr(CheckpointModel, "__module__", "msa.platform.model_registry")  # pickled by reference
    run_id = sweep["client"].get_model_version_by_alias(MODEL_NAME, "champion").run_id
    version = register_checkpoint(sweep["uri"], run_id, Path(sweep["row"].best_checkpoint), "msa-legacy", {}).version
    monkeypatch.undo()
    mlflow.set_tracking_uri(sweep["uri"])
    mlflow.set_registry_uri(sweep["uri"])
    folder = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/msa-legacy/{version}", dst_path=str(tmp_path))
    assert b"msa.platform.model_registry" in (Path(folder) / "python_model.pkl").read_bytes()
    assert b"msa.platform.tracking.registry" not in (Path(folder) / "python_model.pkl").read_bytes()

    model = load_registered(f"models:/msa-legacy/{version}", sweep["uri"])
    test = load_dataset(sweep["data"]).splits["test"]
    inputs = {**{m: x for m, x in test.features.items()}, **{f"{m}_lengths": n for m, n in test.lengths.items()}}
    stored = LoadedCheckpoint(Path(sweep["row"].best_checkpoint)).predict(inputs)
    assert np.array_equal(model.predict(inputs), stored)
